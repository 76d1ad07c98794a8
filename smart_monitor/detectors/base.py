"""The shape every detector has: score a record, decide, then learn only from points
that did not fire; state as plain JSON values."""

from __future__ import annotations

import math
from typing import Any, Protocol

from ..records import Record
from ..triggers import Trigger

__all__ = ["Detector", "isfinite"]


class Detector(Protocol):
    """``update`` is called with every record, in order; ``rewind`` when the trainer
    resumed from the checkpoint at ``step`` and will re-log the steps after it."""

    def update(self, record: Record) -> list[Trigger]: ...

    def rewind(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def isfinite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
