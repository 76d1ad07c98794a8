"""Evaluation outcomes: a new best model, and accuracy falling from its best."""

from __future__ import annotations

import math
from typing import Any

from smart_monitor.batch import TrainBlock
from smart_monitor.config import AccuracyDropConfig, BestModelConfig
from smart_monitor.detectors.base import IgnoresTrainBlocks, isfinite
from smart_monitor.notes import Note
from smart_monitor.records import EvalRecord, Record, TrainRecord
from smart_monitor.stats import Ewma, RollingMedian
from smart_monitor.triggers import Severity, Trigger

__all__ = ["AccuracyDrop", "BestModel"]

_NOISE_EVALS = 16  # evaluation changes kept for the accuracy's noise
_SECOND_DIFF_SIGMA = 0.6745 * 6**0.5  # median abs of N(0, 6 sigma^2), in sigmas


class BestModel:
    """A new best eval loss; until the first eval record, the smoothed train loss.

    An improvement counts only when it beats the best by ``min_delta`` and by
    ``min_rel_delta`` of it, and comes ``min_steps`` after the last one, so a lucky
    batch is not a new best model. The first value only sets the baseline.

    A burst of improvements (a loss falling fast, a new best at every evaluation) does
    not make a snapshot each: within a burst the 1st, 2nd, 4th, 8th, ... fire, and the
    burst's last best fires when it ends (the first evaluation that does not improve),
    while its checkpoint is still there. Each best so far is superseded by the next.

    >>> d = BestModel(BestModelConfig())
    >>> d.update(EvalRecord(500, 0.90, None, {}))
    []
    >>> d.update(EvalRecord(1000, 0.6234, None, {}))[0].name
    'best_model_loss_0.6234'
    >>> [len(d.update(EvalRecord(1000 + 500 * i, 0.6 - 0.05 * i, None, {}))) for i in range(1, 5)]
    [1, 0, 1, 0]
    >>> [(t.name, t.step) for t in d.update(EvalRecord(4000, 0.5, None, {}))]
    [('best_model_loss_0.4000', 3000)]
    """

    kind = "best_model_loss"

    def __init__(self, config: BestModelConfig) -> None:
        self.config = config
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.last_z: float | None = None  # no z-score
        self.best: float | None = None
        self.best_step: int | None = None
        self.eval_seen = False
        self.train_ewma: float | None = None
        self.train_best: float | None = None
        self.train_best_step: int | None = None
        self.burst = 0  # improvements in a row
        self.pending: tuple[int, float, str] | None = None  # a burst's best not yet fired

    def update(self, record: Record) -> list[Trigger]:
        if isinstance(record, EvalRecord) and isfinite(record.eval_loss):
            self.eval_seen = True
            return self._eval(record.step, float(record.eval_loss))  # type: ignore[arg-type]
        if isinstance(record, TrainRecord) and not self.eval_seen and isfinite(record.loss):
            return self._train(record.step, float(record.loss))  # type: ignore[arg-type]
        return []

    def _improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return False
        margin = max(self.config.min_delta, self.config.min_rel_delta * abs(best))
        return value < best - margin

    def _eval(self, step: int, loss: float) -> list[Trigger]:
        if self.best is None:
            self.best, self.best_step = loss, step
            return []
        if not self._improves(loss, self.best):
            return self._ended()
        if self.best_step is not None and step - self.best_step < self.config.min_steps:
            return []
        self.best, self.best_step = loss, step
        return self._improved(step, loss, "eval_loss")

    def _improved(self, step: int, value: float, source: str) -> list[Trigger]:
        """A new best: fired at once if its place in the burst is a power of two."""
        self.burst += 1
        if self.burst & (self.burst - 1):
            self.pending = (step, value, source)
            return []
        self.pending = None
        return [self._trigger(step, value, source)]

    def _ended(self) -> list[Trigger]:
        """No improvement: the burst is over; its last best, if not yet fired, now."""
        pending, self.pending, self.burst = self.pending, None, 0
        return [self._trigger(*pending)] if pending else []

    def _trigger(self, step: int, value: float, source: str) -> Trigger:
        details = {"value": value, "source": source, "burst": self.burst}
        return Trigger(self.kind, f"{self.kind}_{value:.4f}", Severity.INFO, step, details)

    def _train(self, step: int, loss: float) -> list[Trigger]:
        self.train_ewma = Ewma(self.config.train_alpha, self.train_ewma).add(loss)
        if self.train_best is None:
            self.train_best, self.train_best_step = self.train_ewma, step
            return []
        if (
            self.train_best_step is not None
            and step - self.train_best_step < self.config.train_min_steps
        ):
            return []
        if not self._improves(self.train_ewma, self.train_best):
            return self._ended()
        self.train_best, self.train_best_step = self.train_ewma, step
        return self._improved(step, self.train_ewma, "train_loss_smoothed")

    def screen(self, block: TrainBlock, start: int, stop: int) -> int:
        """Before the first eval record, the smoothed train loss can make a best model or
        end a burst: the recurrence runs here (cheap, and exactly as ``update`` computes
        it)."""
        if self.eval_seen or block.loss is None:
            return stop
        ewma, best, best_step = self.train_ewma, self.train_best, self.train_best_step
        if ewma is None or best is None or best_step is None:
            return start
        smooth = Ewma(self.config.train_alpha, ewma)
        min_steps = self.config.train_min_steps
        margin = max(self.config.min_delta, self.config.min_rel_delta * abs(best))
        for i, (step, loss, *_) in enumerate(block.rows[start:stop], start):
            ewma = smooth.add(loss)  # type: ignore[arg-type]
            # in a burst, a record that does not improve ends it (and may fire)
            if step - best_step >= min_steps and (self.burst or ewma < best - margin):
                return i
        return stop

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        if self.eval_seen or block.loss is None or start >= end:
            return
        assert self.train_ewma is not None  # screen sends the first train record to update
        smooth = Ewma(self.config.train_alpha, self.train_ewma)
        for _, loss, *_ in block.rows[start:end]:
            smooth.add(loss)  # type: ignore[arg-type]
        self.train_ewma = smooth.value

    def rewind(self, step: int) -> None:
        if self.best_step is not None and self.best_step > step:
            self.best = self.best_step = None
        if self.train_best_step is not None and self.train_best_step > step:
            self.train_ewma = self.train_best = self.train_best_step = None
        if self.pending is not None and self.pending[0] > step:
            self.pending = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "eval_seen": self.eval_seen,
            "train_ewma": self.train_ewma,
            "train_best": self.train_best,
            "train_best_step": self.train_best_step,
            "burst": self.burst,
            "pending": list(self.pending) if self.pending else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_step = state.get("best_step")
        self.eval_seen = bool(state.get("eval_seen", False))
        self.train_ewma = state.get("train_ewma")
        self.train_best = state.get("train_best")
        self.train_best_step = state.get("train_best_step")
        self.burst = int(state.get("burst", 0))
        pending = state.get("pending")
        self.pending = (int(pending[0]), float(pending[1]), str(pending[2])) if pending else None


class AccuracyDrop(IgnoresTrainBlocks):
    """Fires when eval accuracy falls more than ``threshold_pct`` percentage points below
    its best, and more than ``noise_k`` times its own noise (from the median second
    difference of successive evaluations, which a rising trend does not inflate: a
    small, noisy validation set moves by whole points), once:
    evals are hundreds of steps apart, so an incident cannot group them; it fires again
    only after the accuracy came back within the threshold. Accuracy in [0, 1] is read
    as a fraction, above 1 as a percentage.

    >>> d = AccuracyDrop(AccuracyDropConfig())
    >>> d.update(EvalRecord(1, None, 0.80, {}))
    []
    >>> d.update(EvalRecord(2, None, 0.677, {}))[0].name
    'accuracy_drop_12.3pct'
    """

    kind = "accuracy_drop"

    def __init__(self, config: AccuracyDropConfig) -> None:
        self.config = config
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.last_z: float | None = None  # no z-score
        self.best: float | None = None
        self.best_step: int | None = None
        self.active = False
        self.last: float | None = None
        self.last_change: float | None = None
        self.changes = RollingMedian(_NOISE_EVALS)  # abs second difference of evaluations

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, EvalRecord) or not isfinite(record.accuracy):
            return []
        acc = float(record.accuracy)  # type: ignore[arg-type]
        pct = acc * 100.0 if acc <= 1.0 else acc
        threshold = self._threshold()  # the noise before this value
        if self.last is not None:
            change = pct - self.last
            if self.last_change is not None:  # a trend (accuracy still rising) cancels out
                self.changes.add(record.step, abs(change - self.last_change))
            self.last_change = change
        self.last = pct
        if self.best is None or pct > self.best:
            self.best, self.best_step, self.active = pct, record.step, False
            return []
        drop = self.best - pct
        if drop <= threshold or math.isclose(drop, threshold):
            self.active = False
            return []
        if self.active:
            return []
        self.active = True
        details = {"value": pct, "best": self.best, "best_step": self.best_step}
        return [
            Trigger(self.kind, f"{self.kind}_{drop:.1f}pct", Severity.WARNING, record.step, details)
        ]

    def _threshold(self) -> float:
        """``threshold_pct``, or ``noise_k`` times the accuracy's noise if larger: the
        median abs second difference of evaluations is 1.65 sigma of white noise."""
        noise = self.changes.median / _SECOND_DIFF_SIGMA if len(self.changes) else 0.0
        return max(self.config.threshold_pct, self.config.noise_k * noise)

    def rewind(self, step: int) -> None:
        self.active = False
        self.changes.rewind(step)
        if self.best_step is not None and self.best_step > step:
            self.best = self.best_step = None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "active": self.active,
                "last": self.last, "last_change": self.last_change,
                "changes": self.changes.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_step = state.get("best_step")
        self.active = bool(state.get("active", False))
        self.last = state.get("last")
        self.last_change = state.get("last_change")
        self.changes.load_state_dict(state.get("changes", {}))
