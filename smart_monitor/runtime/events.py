"""What the engine tells its listeners (metrics, actions, plots, ``replay --report``,
the daemon itself): one frozen value per kind of event, matched by type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from smart_monitor.pipeline import SnapshotRequest

__all__ = [
    "Detected", "Event", "IncidentRecovered", "IncidentSettled", "Listener", "Restarted",
    "SnapshotFailed", "SnapshotMade",
]  # fmt: skip


@dataclass(frozen=True, slots=True)
class Detected:
    """One trigger fired (``kind``: its kind, ``loss_zscore``, not its full name)."""

    name: ClassVar[str] = "detected"
    kind: str
    severity: str
    step: int


@dataclass(frozen=True, slots=True)
class SnapshotMade:
    name: ClassVar[str] = "snapshot"
    request: SnapshotRequest
    path: Path
    bytes: int


@dataclass(frozen=True, slots=True)
class SnapshotFailed:
    name: ClassVar[str] = "snapshot_failed"
    request: SnapshotRequest
    reason: str


@dataclass(frozen=True, slots=True)
class Restarted:
    """The trainer's steps went backwards (it resumed from a checkpoint)."""

    name: ClassVar[str] = "restarted"
    step: int


@dataclass(frozen=True, slots=True)
class IncidentRecovered:
    """An incident ended with the run back: quiet for ``recovery_steps`` and
    ``recovery_records``, and for a loss incident the loss back within its level and
    noise before it (``level_before``, ``level_now``: None for other problems). The one
    event on which an alert may resolve. ``incident``: its id, as in the log and in
    ``metadata.json``; ``severity``: its peak severity."""

    name: ClassVar[str] = "recovered"
    incident: str
    problem: str
    started: int
    step: int
    severity: str
    peak_trigger: str
    snapshot: Path | None  # the newest snapshot of the incident, if it made one
    level_before: float | None = None
    level_now: float | None = None


@dataclass(frozen=True, slots=True)
class IncidentSettled:
    """A loss incident ended without the run coming back: detections stopped because
    the loss stays at a worse level (``level_now``, ``ratio`` times ``level_before``).
    Not a recovery: an alert must stay firing (``trigger``: the kind that opened it, the
    label its open-incident series had in /metrics)."""

    name: ClassVar[str] = "settled"
    incident: str
    problem: str
    started: int
    step: int
    severity: str
    level_before: float
    level_now: float
    ratio: float | None
    trigger: str


Event = (
    Detected | SnapshotMade | SnapshotFailed | Restarted | IncidentRecovered | IncidentSettled
)
Listener = Callable[[Event], None]
