"""What the engine tells its listeners (metrics, actions, plots, ``replay --report``,
the daemon itself): one frozen value per kind of event, matched by type."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from smart_monitor.pipeline import SnapshotRequest

__all__ = ["Detected", "Event", "Listener", "Restarted", "SnapshotFailed", "SnapshotMade"]


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


Event = Detected | SnapshotMade | SnapshotFailed | Restarted
Listener = Callable[[Event], None]
