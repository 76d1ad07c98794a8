"""The shape every detector has: score a record, decide, then learn only from points
that did not fire; state as plain JSON values."""

from __future__ import annotations

import math
from typing import Any, Protocol

from smart_monitor.batch import TrainBlock
from smart_monitor.notes import Note
from smart_monitor.records import ExampleRecord, Record
from smart_monitor.triggers import Trigger

__all__ = ["Detector", "IgnoresTrainBlocks", "NotesTrainSteps", "isfinite"]


class Detector(Protocol):
    """``update`` is called with every record, in order; ``rewind`` when the trainer
    resumed from the checkpoint at ``step`` and will re-log the steps after it.

    ``screen``/``absorb`` are the bulk path for runs of plain train records (see
    ``batch.py``): ``screen`` returns the index of the first record in ``[start, stop)``
    that might fire (``stop`` if none can), conservatively; ``absorb`` then changes the
    state exactly as ``update`` would have for the quiet records ``[start, end)``.

    Besides triggers the pipeline reads two things of every detector: ``notes``, log
    events that are no detection (``LR changed``), which it drains after each record,
    and ``last_z``, the z-score of the last value scored (snapshot metadata
    ``z_scores``; None for a detector without one).
    """

    notes: list[Note]

    @property
    def last_z(self) -> float | None: ...

    def update(self, record: Record) -> list[Trigger]: ...

    def screen(self, block: TrainBlock, start: int, stop: int) -> int: ...

    def absorb(self, block: TrainBlock, start: int, end: int) -> None: ...

    def rewind(self, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class IgnoresTrainBlocks:
    """For a detector that no finite train record can fire and that keeps nothing of it."""

    def screen(self, block: TrainBlock, start: int, stop: int) -> int:
        return stop

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        return None


class NotesTrainSteps(IgnoresTrainBlocks):
    """For a detector of prediction examples, which keeps only the step of the other
    records: an example without a step takes the latest one."""

    last_step: int

    def example(self, record: Record) -> tuple[ExampleRecord, int] | None:
        """The example and its step; None for another record, whose step is noted."""
        if isinstance(record, ExampleRecord):
            return record, record.step if record.step is not None else self.last_step
        if record.step is not None:
            self.last_step = record.step
        return None

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        self.last_step = block.rows[end - 1][0]


def isfinite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
