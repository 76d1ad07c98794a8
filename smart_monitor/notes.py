"""Log events that are not detections: a planned LR change, an incident still open, a
recurring transient, a new run, interleaved writers. The pure core decides them; the
engine only writes each one as it is (``level`` is the log method)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Note"]


@dataclass(frozen=True, slots=True)
class Note:
    """One log line: ``event`` is its fixed text (DESIGN.md's log section), ``fields``
    its ``key=value`` tokens.

    >>> Note("LR changed", "info", {"step": 12132, "previous": 20.0, "value": 5.0}).event
    'LR changed'
    """

    event: str
    level: Literal["info", "warning", "critical"]
    fields: Mapping[str, Any] = field(default_factory=dict)
