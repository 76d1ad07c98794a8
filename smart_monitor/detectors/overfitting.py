"""Overfitting: the conclusion "best model was at step N, after that overfitting began".

Decided as Keras's and Lightning's ``EarlyStopping`` decide to stop (``patience``,
``min_delta``), without stopping anything: the main eval loss (or, in a run without
one, eval accuracy, higher being better) is worse than its best for ``patience``
evaluations in a row, each time by more than ``min_delta``, ``min_rel_delta`` of the
best and ``noise_k`` times the eval's own noise (the median change between successive
evaluations), while the train loss falls (below). One warning per episode; a new best
ends it.

The train loss must have fallen since the best evaluation, by more than its own noise
(``noise_k`` times the spread of its EWMA, from the median change between successive
train records): overfitting is a model that fits its training data better while it
generalises worse. A model whose train loss stays put barely changes, so an eval that
gets worse meanwhile is noise around a slow improvement (dev-tb T06 after its resumes:
+5-8 % for a few epochs, then new bests up to epoch 289), and a train loss stepped up
with the eval (a resume with its LR replanned, T06 at 16) or drifting up while the eval
explodes (T08) is a disturbance or a divergence, which the loss and series detectors
report. ``train_tolerance`` (0 by default) lets a train loss that rose by that share of
its level count as held, for runs whose train loss is no guide. The train level at an
evaluation is the EWMA after the last train record at or before its step, so a replay
that reads a folder's train file before its validation file (Keras's ``train/`` and
``validation/``) compares the same moments as a live run does.

At the run's end (HF's end-of-training record, a new run starting in the same folder,
the end of a replay: a ``SummaryRecord``) patience has nothing left to wait for: an
episode is concluded then if at least ``min(patience, 2)`` evaluations came after the
best, the last of them worse than the best by more than the margin, and the ones in
between either each beyond the margin too or each no better than the one before (the
eval still rising when the run stopped: dev-tb T18's run A, 0.2626 at its best, then
0.2680 and 0.2986, +14 %), with the train loss held as above. One evaluation worse is
not enough: a last evaluation can be a blip.
"""

from __future__ import annotations

import math
import statistics
from bisect import bisect_right
from collections import deque
from typing import Any

import numpy as np
import numpy.typing as npt

from smart_monitor.batch import Floats, TrainBlock
from smart_monitor.config import OverfittingConfig
from smart_monitor.detectors.base import isfinite
from smart_monitor.notes import Note
from smart_monitor.records import EvalRecord, Record, SummaryRecord, TrainRecord
from smart_monitor.stats import DIFF_SIGMA, Ewma, RollingMedian
from smart_monitor.triggers import Severity, Trigger

__all__ = ["Overfitting"]

_NOISE_EVALS = 32  # successive evaluation changes kept for the noise estimate
_NOISE_RECORDS = 64  # successive train-loss changes kept for the train loss's noise
_TRAIL = 256  # (step, train EWMA) of the latest train records, for evaluations behind them


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
        self.worse = 0  # evaluations in a row worse than the best beyond the margin
        self.after = 0  # evaluations since the best
        self.rising = True  # each evaluation since the best no better than the one before
        self.fired = False
        self.last: float | None = None
        self.changes: deque[float] = deque(maxlen=_NOISE_EVALS)
        self.train = Ewma(config.train_alpha)
        self.trail: deque[tuple[int, float]] = deque(maxlen=_TRAIL)  # (step, EWMA)
        # the records absorbed last (steps, losses, the EWMA before them): their levels
        # join the trail only when a lookup needs them (``_settle``); an evaluation
        # after its train records needs only the EWMA's value
        self._unsettled: tuple[npt.NDArray[np.int64], Floats, float | None] | None = None
        self.train_changes = RollingMedian(_NOISE_RECORDS)
        self.train_last: float | None = None

    def update(self, record: Record) -> list[Trigger]:
        if isinstance(record, TrainRecord):
            if isfinite(record.loss):
                self._train(record.step, float(record.loss))  # type: ignore[arg-type]
            return []
        if isinstance(record, SummaryRecord):
            return self._end(record.step) if record.step is not None else []
        if not isinstance(record, EvalRecord):
            return []
        value = self._value(record)
        if value is None:
            return []
        return self._eval(record.step, value)

    def _train(self, step: int, loss: float) -> None:
        self._settle()
        if self.train_last is not None:
            self.train_changes.add(step, abs(loss - self.train_last))
        self.train_last = loss
        self.trail.append((step, self.train.add(loss)))

    def _train_at(self, step: int) -> float | None:
        """The train EWMA after the last train record at or before ``step`` (None if
        that is older than the trail kept, or there is none)."""
        trail, unsettled = self.trail, self._unsettled
        newest = unsettled[0][-1] if unsettled is not None else trail[-1][0] if trail else None
        if newest is None or newest <= step:
            return self.train.value
        self._settle()
        i = bisect_right(trail, step, key=lambda p: p[0])
        return trail[i - 1][1] if i else None

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
        previous = self.last
        if previous is not None:
            self.changes.append(abs(value - previous))
        self.last = value
        best = self.best
        margin = self._margin()
        if best is None or value < best:  # a new best; beyond the margin, a new episode
            self.fired = self.fired and best is not None and value >= best - margin
            self.best, self.best_step, self.train_at_best = value, step, self._train_at(step)
            self.worse = self.after = 0
            self.rising = True
            return []
        self.after += 1
        self.rising = self.rising and (previous is None or value >= previous)
        if value - best <= margin:
            self.worse = 0
            return []
        self.worse += 1
        if self.fired or self.worse < self.config.patience or not self._train_holds(step):
            return []
        return self._fire(step, value, best, margin)

    def _end(self, step: int) -> list[Trigger]:
        """The run ended: the episode under way is concluded if the evaluations since
        the best say it already (see the module's docstring)."""
        best, value = self.best, self.last
        if self.fired or best is None or value is None or self.best_step is None:
            return []
        margin = self._margin()
        if self.after < min(self.config.patience, 2) or value - best <= margin:
            return []
        if not (self.worse == self.after or self.rising) or not self._train_holds(step):
            return []
        return self._fire(max(step, self.best_step), value, best, margin, run_end=True)

    def _fire(
        self, step: int, value: float, best: float, margin: float, run_end: bool = False
    ) -> list[Trigger]:
        self.fired = True
        sign = -1.0 if self.source == "accuracy" else 1.0
        details = {
            "best_step": self.best_step,
            "best_value": sign * best,
            "value": sign * value,
            "source": self.source,
            "evaluations_worse": self.worse,
            "evaluations_after_best": self.after,
            "at_run_end": run_end,
            "rel_change": (value - best) / abs(best) if best else math.inf,
            "noise": margin,
            "train_loss_at_best": self.train_at_best,
            "train_loss_now": self._train_at(step),
            "train_noise": self._train_noise(),
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

    def _train_holds(self, step: int) -> bool:
        """The train loss fell since the best evaluation by more than its noise (or
        rose by at most ``train_tolerance``, when that is set); True if unknown."""
        now, then = self._train_at(step), self.train_at_best
        if now is None or then is None:
            return True
        tolerance = self.config.train_tolerance
        if tolerance > 0:
            return now <= then + tolerance * abs(then)
        return now < then - self.config.noise_k * self._train_noise()

    def _train_noise(self) -> float:
        """The spread of the train EWMA: the train loss's own (a robust std from the
        median change between successive records) times sqrt(alpha / (2 - alpha))."""
        if not len(self.train_changes):
            return 0.0
        alpha = self.config.train_alpha
        return DIFF_SIGMA * self.train_changes.median * math.sqrt(alpha / (2.0 - alpha))

    def screen(self, block: TrainBlock, start: int, stop: int) -> int:
        return stop  # a train record never fires

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        if block.loss is None or start >= end:
            return
        losses, steps = block.loss[start:end], block.steps[start:end]  # finite (train_row)
        # what ``_train`` does a record at a time, in numpy: the changes between
        # successive losses (the window keeps the last ones; the run's first loss has
        # none before it), the EWMA's level, and the records the trail keeps
        n = len(losses)
        if self.train_last is not None and n <= _NOISE_RECORDS:
            last, at = np.concatenate([[self.train_last], losses]), steps
        else:
            last = losses[-(_NOISE_RECORDS + 1) :]
            at = steps[n - len(last) + 1 :]
        self.train_changes.extend(at.tolist(), np.abs(last[1:] - last[:-1]).tolist())
        self.train_last = float(losses[-1])
        tail = max(0, n - _TRAIL)
        if tail:  # the trail keeps none of the records before
            self.trail.clear()
            self._unsettled = None
        self._settle()
        self.train.extend(losses[:tail])
        before = self.train.value
        self.train.extend(losses[tail:])
        self._unsettled = (steps[tail:], losses[tail:], before)

    def _settle(self) -> None:
        """The levels of the records absorbed last, into the trail."""
        if self._unsettled is None:
            return
        steps, losses, before = self._unsettled
        self._unsettled = None
        levels = Ewma(self.config.train_alpha, before).levels(losses)
        self.trail.extend(zip(steps.tolist(), levels.tolist(), strict=True))

    def rewind(self, step: int) -> None:
        self._settle()
        while self.trail and self.trail[-1][0] > step:
            self.trail.pop()
        self.train_changes.rewind(step)
        if self.best_step is not None and self.best_step > step:
            self.best = self.best_step = self.train_at_best = self.last = None
            self.changes.clear()
        self.worse = self.after = 0
        self.rising, self.fired = True, False

    def state_dict(self) -> dict[str, Any]:
        self._settle()
        return {
            "source": self.source,
            "best": self.best,
            "best_step": self.best_step,
            "train_at_best": self.train_at_best,
            "worse": self.worse,
            "after": self.after,
            "rising": self.rising,
            "fired": self.fired,
            "last": self.last,
            "changes": list(self.changes),
            "train": self.train.value,
            "trail": [list(p) for p in self.trail],
            "train_changes": self.train_changes.state_dict(),
            "train_last": self.train_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.source = state.get("source")
        self.best = state.get("best")
        self.best_step = state.get("best_step")
        self.train_at_best = state.get("train_at_best")
        self.worse = int(state.get("worse", 0))
        self.after = int(state.get("after", self.worse))
        self.rising = bool(state.get("rising", True))
        self.fired = bool(state.get("fired", False))
        self.last = state.get("last")
        self.changes.clear()
        self.changes.extend(float(c) for c in state.get("changes", []))
        self.train.value = state.get("train")
        self.trail.clear()
        self.trail.extend((int(s), float(v)) for s, v in state.get("trail", []))
        self._unsettled = None
        self.train_changes.load_state_dict(state.get("train_changes", {}))
        self.train_last = state.get("train_last")
