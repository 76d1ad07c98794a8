"""Overfitting: the conclusion "best model was at step N, after that overfitting began".

Decided as Keras's and Lightning's ``EarlyStopping`` decide to stop (``patience``,
``min_delta``), without stopping anything: the main eval loss (or, in a run without
one, eval accuracy, higher being better) is worse than its best for ``patience``
evaluations in a row, each time by more than ``min_delta``, ``min_rel_delta`` of the
best and ``noise_k`` times the eval's own noise (the median change between successive
evaluations), while the train loss is flat or falling (its EWMA no more than
``train_tolerance`` above where it was at the best evaluation: a train loss that rises
too is a divergence, not overfitting). One warning per episode; a new best ends it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

import numpy as np

from smart_monitor.batch import TrainBlock
from smart_monitor.config import OverfittingConfig
from smart_monitor.detectors.base import isfinite
from smart_monitor.notes import Note
from smart_monitor.records import EvalRecord, Record, TrainRecord
from smart_monitor.stats import Ewma
from smart_monitor.triggers import Severity, Trigger

__all__ = ["Overfitting"]

_NOISE_EVALS = 32  # successive evaluation changes kept for the noise estimate


class Overfitting:
    """``overfitting_from_<best step>``, once per episode.

    >>> d = Overfitting(OverfittingConfig())
    >>> evals = [0.60, 0.45, 0.40, 0.38, 0.48, 0.52, 0.60]
    >>> fired = []
    >>> for i, v in enumerate(evals):
    ...     _ = d.update(TrainRecord(i * 100 + 50, 1.0 - 0.1 * i, None, None, {}))
    ...     fired += d.update(EvalRecord(i * 100 + 100, v, None, {}))
    >>> [(t.name, t.step, t.details["best_value"]) for t in fired]
    [('overfitting_from_400', 700, 0.38)]
    """

    kind = "overfitting"

    def __init__(self, config: OverfittingConfig) -> None:
        self.config = config
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.last_z: float | None = None  # no z-score
        self.source: str | None = None  # "eval_loss" or "accuracy", the first one seen
        self.best: float | None = None  # in "lower is better" units
        self.best_step: int | None = None
        self.train_at_best: float | None = None
        self.worse = 0
        self.fired = False
        self.last: float | None = None
        self.changes: deque[float] = deque(maxlen=_NOISE_EVALS)
        self.train = Ewma(config.train_alpha)

    def update(self, record: Record) -> list[Trigger]:
        if isinstance(record, TrainRecord):
            if isfinite(record.loss):
                self.train.add(float(record.loss))  # type: ignore[arg-type]
            return []
        if not isinstance(record, EvalRecord):
            return []
        value = self._value(record)
        if value is None:
            return []
        return self._eval(record.step, value)

    def _value(self, record: EvalRecord) -> float | None:
        """The watched eval value, lower is better; None if this record has none."""
        if self.source is None:
            if isfinite(record.eval_loss):
                self.source = "eval_loss"
            elif isfinite(record.accuracy):
                self.source = "accuracy"
        if self.source == "eval_loss" and isfinite(record.eval_loss):
            return float(record.eval_loss)  # type: ignore[arg-type]
        if self.source == "accuracy" and isfinite(record.accuracy):
            return -float(record.accuracy)  # type: ignore[arg-type]
        return None

    def _eval(self, step: int, value: float) -> list[Trigger]:
        if self.last is not None:
            self.changes.append(abs(value - self.last))
        self.last = value
        best = self.best
        margin = self._margin()
        if best is None or value < best:  # a new best; beyond the margin, a new episode
            self.fired = self.fired and best is not None and value >= best - margin
            self.best, self.best_step, self.train_at_best = value, step, self.train.value
            self.worse = 0
            return []
        if value - best <= margin:
            self.worse = 0
            return []
        self.worse += 1
        if self.fired or self.worse < self.config.patience or not self._train_holds():
            return []
        self.fired = True
        sign = -1.0 if self.source == "accuracy" else 1.0
        details = {
            "best_step": self.best_step,
            "best_value": sign * best,
            "value": sign * value,
            "source": self.source,
            "evaluations_worse": self.worse,
            "rel_change": (value - best) / abs(best) if best else math.inf,
            "noise": margin,
            "train_loss_at_best": self.train_at_best,
            "train_loss_now": self.train.value,
        }
        name = f"overfitting_from_{self.best_step}"
        return [Trigger(self.kind, name, Severity.WARNING, step, details)]

    def _margin(self) -> float:
        """How much worse than the best an evaluation must be to count: ``min_delta``,
        ``min_rel_delta`` of the best, and the eval's own noise."""
        config = self.config
        rel = config.min_rel_delta * abs(self.best) if self.best is not None else 0.0
        noise = statistics.median(self.changes) if self.changes else 0.0
        return max(config.min_delta, rel, config.noise_k * noise)

    def _train_holds(self) -> bool:
        """The train loss is flat or falling since the best evaluation (or unknown)."""
        now, then = self.train.value, self.train_at_best
        if now is None or then is None:
            return True
        return now <= then + self.config.train_tolerance * abs(then)

    def screen(self, block: TrainBlock, start: int, stop: int) -> int:
        return stop  # a train record never fires

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        if block.loss is None:
            return
        losses = block.loss[start:end]
        self.train.extend(losses[np.isfinite(losses)])

    def rewind(self, step: int) -> None:
        if self.best_step is not None and self.best_step > step:
            self.best = self.best_step = self.train_at_best = self.last = None
            self.changes.clear()
        self.worse, self.fired = 0, False

    def state_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "best": self.best,
            "best_step": self.best_step,
            "train_at_best": self.train_at_best,
            "worse": self.worse,
            "fired": self.fired,
            "last": self.last,
            "changes": list(self.changes),
            "train": self.train.value,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source = state.get("source")
        self.best = state.get("best")
        self.best_step = state.get("best_step")
        self.train_at_best = state.get("train_at_best")
        self.worse = int(state.get("worse", 0))
        self.fired = bool(state.get("fired", False))
        self.last = state.get("last")
        self.changes.clear()
        self.changes.extend(float(c) for c in state.get("changes", []))
        self.train.value = state.get("train")
