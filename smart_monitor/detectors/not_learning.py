"""Not learning: the conclusion "this run has not learned anything since it started".

No relative rule sees a run that is wrong from its first record (``dev/`` nlpia2
RNN_TANH: a loss worse than a uniform guess for five epochs, no spike, no NaN), nor an
LR so small that nothing moves. After ``min_records`` train records past the warm-up
(records whose LR is still rising do not count: nothing need move yet) this detector
asks once whether the train loss ever came down from its starting level (the median of
the first ``window`` records) by more than ``min_rel_drop`` of it and ``noise_k`` times
the loss's own noise (from the median change between successive records, which a descent
inflates far less than the spread of the first records does), judged on a rolling median
of ``window`` records so a lucky batch is not learning, or whether it falls steadily (a
least-squares slope over those ``min_records`` records more than ``trend_t`` standard
errors below zero: a slow fine-tune that has not yet dropped ``min_rel_drop`` is
learning all the same). A run that learned, then converged, answered yes long before and
is never judged again. Also: an LR at most ``zero_lr`` in every record so far, and in a
run that logs no train loss, an eval accuracy that never rose ``min_gain_pct`` points
above its first value in ``min_evals`` evaluations.

``min_records`` is how long to wait before judging a run still going: a noisy per-step
run may not yet show its descent. At the run's end (HF's end-of-training record, a new
run starting in the same folder, the end of a replay: a ``SummaryRecord``) nothing is
left to wait for, and the same loss test is made on what the run logged, provided it
logged at least ``window`` records past the start window and the warm-up (a start level
and one rolling median wholly after it: the least that can show a drop at all). So a
Keras run of 18 epochs whose loss never left its starting level (dev-tb T02: 12.5 at
epoch 0, 12.2 at 17, 10.5-16.4 between) is concluded when it ends.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from smart_monitor.batch import TrainBlock
from smart_monitor.config import NotLearningConfig
from smart_monitor.detectors.base import isfinite
from smart_monitor.notes import Note
from smart_monitor.records import EvalRecord, Record, SummaryRecord, TrainRecord
from smart_monitor.stats import DIFF_SIGMA, RollingMedian
from smart_monitor.triggers import Severity, Trigger

__all__ = ["NotLearning"]

_NOISE_RECORDS = 64  # successive changes kept for the noise estimate
_MEDIAN_SPREAD = 1.2533  # sqrt(pi / 2): a median's std over a mean's, for normal noise


class NotLearning:
    """``not_learning_<records>``, at most once per run.

    >>> d = NotLearning(NotLearningConfig(min_records=15, window=5))
    >>> losses = [17.7, 18.1, 17.9, 19.2, 18.4, 17.8, 18.9, 18.0, 19.4, 18.2] * 2
    >>> records = [TrainRecord(i, v, 20.0, None, {}) for i, v in enumerate(losses)]
    >>> [(t.name, t.details["reason"]) for r in records for t in d.update(r)]
    [('not_learning_20', 'loss')]
    """

    kind = "not_learning"

    def __init__(self, config: NotLearningConfig) -> None:
        self.config = config
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.last_z: float | None = None  # no z-score
        self.records = 0  # train records with a finite loss
        self.start: list[float] = []  # the first ``window`` losses
        self.first: list[float] = []  # the first ``min_records`` losses after warm-up
        self.recent = RollingMedian(config.window)
        self.changes = RollingMedian(_NOISE_RECORDS)  # abs change between successive losses
        self.last: float | None = None
        self.lowest = math.inf  # the lowest rolling median after the start window
        self.lr_records = 0
        self.lr_max = 0.0
        self.evals: list[float] = []  # accuracy in percent, while no train loss is seen
        self.done = False  # judged: it learned, or it fired

    def update(self, record: Record) -> list[Trigger]:
        if self.done:
            return []
        if isinstance(record, TrainRecord):
            return self._train(record.step, record.loss, record.learning_rate)
        if isinstance(record, SummaryRecord):
            return self._end(record.step) if record.step is not None else []
        if isinstance(record, EvalRecord) and not self.records and isfinite(record.accuracy):
            return self._accuracy(record.step, float(record.accuracy))  # type: ignore[arg-type]
        return []

    def _train(self, step: int, loss: float | None, lr: float | None) -> list[Trigger]:
        config = self.config
        warming = False  # an LR still rising: the warm-up, when no loss need move yet
        if lr is not None and math.isfinite(lr):
            warming = abs(lr) > self.lr_max
            self.lr_records += 1
            self.lr_max = max(self.lr_max, abs(lr))
        if loss is None or not math.isfinite(loss):
            return []
        self.records += 1
        self.recent.add(step, loss)
        if self.last is not None:
            self.changes.add(step, abs(loss - self.last))
        self.last = loss
        if len(self.start) < config.window:
            self.start.append(loss)
            return []
        if not warming and len(self.first) < config.min_records:
            self.first.append(loss)
        self.lowest = min(self.lowest, self.recent.median)
        level, noise = self._start()
        margin = self._margin(level, noise)
        if level <= noise * config.noise_k or level <= 0:
            self.done = True  # a loss about 0 by construction (policy gradient): no level
            return []
        if self.lowest < level - margin:
            self.done = True  # it learned
            return []
        if self.lr_records >= config.min_records and self.lr_max <= config.zero_lr:
            return self._fire(step, "learning_rate", {"max_learning_rate": self.lr_max})
        if len(self.first) < config.min_records:
            return []
        return self._judge(step, level, noise, margin)

    def _judge(self, step: int, level: float, noise: float, margin: float) -> list[Trigger]:
        """The loss never left its starting level: falling steadily, or not learning."""
        slope, t = _trend(self.first)
        if t < -self.config.trend_t:
            self.done = True  # falling steadily
            return []
        figures = {"start_level": level, "lowest_level": self.lowest, "noise": noise,
                   "needed_drop": margin, "slope_per_record": slope, "slope_t": t,
                   "at_run_end": len(self.first) < self.config.min_records}
        return self._fire(step, "loss", figures)

    def _end(self, step: int) -> list[Trigger]:
        """The run ended: judge what it logged if that is enough (module docstring)."""
        config = self.config
        if len(self.first) < config.window:
            return []
        level, noise = self._start()
        margin = self._margin(level, noise)
        if self.lowest < level - margin:
            self.done = True  # it learned, by the noise the whole run shows
            return []
        return self._judge(step, level, noise, margin)

    def _margin(self, level: float, noise: float) -> float:
        """How far below ``level`` the rolling median must come to have learned."""
        config = self.config
        # the rolling median of ``window`` records is that much less noisy than a record
        spread = noise * _MEDIAN_SPREAD / math.sqrt(config.window)
        return max(config.min_rel_drop * abs(level), config.noise_k * spread)

    def _start(self) -> tuple[float, float]:
        """The starting level and the loss's noise (a robust std)."""
        level = statistics.median(self.start)
        return level, DIFF_SIGMA * self.changes.median

    def _accuracy(self, step: int, accuracy: float) -> list[Trigger]:
        pct = accuracy * 100.0 if accuracy <= 1.0 else accuracy
        self.evals.append(pct)
        if pct > self.evals[0] + self.config.min_gain_pct:
            self.done = True
            return []
        if len(self.evals) < self.config.min_evals:
            return []
        figures = {"first_accuracy_pct": self.evals[0], "best_accuracy_pct": max(self.evals)}
        return self._fire(step, "accuracy", figures, count=len(self.evals))

    def _fire(
        self, step: int, reason: str, figures: dict[str, Any], count: int | None = None
    ) -> list[Trigger]:
        self.done = True
        records = self.records if count is None else count
        details = {"reason": reason, "records": records, **figures}
        return [Trigger(self.kind, f"{self.kind}_{records}", Severity.WARNING, step, details)]

    def screen(self, block: TrainBlock, start: int, stop: int) -> int:
        return stop if self.done else start

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        for step, loss, lr, *_ in block.rows[start:end]:
            if self.done:
                return
            self._train(step, loss, lr)

    def rewind(self, step: int) -> None:
        self.recent.rewind(step)
        self.changes.rewind(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "start": list(self.start),
            "first": list(self.first),
            "recent": self.recent.state_dict(),
            "changes": self.changes.state_dict(),
            "last": self.last,
            "lowest": None if math.isinf(self.lowest) else self.lowest,
            "lr_records": self.lr_records,
            "lr_max": self.lr_max,
            "evals": list(self.evals),
            "done": self.done,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = int(state.get("records", 0))
        self.start = [float(v) for v in state.get("start", [])]
        self.first = [float(v) for v in state.get("first", [])]
        self.recent.load_state_dict(state.get("recent", {}))
        self.changes.load_state_dict(state.get("changes", {}))
        self.last = state.get("last")
        lowest = state.get("lowest")
        self.lowest = math.inf if lowest is None else float(lowest)
        self.lr_records = int(state.get("lr_records", 0))
        self.lr_max = float(state.get("lr_max", 0.0))
        self.evals = [float(v) for v in state.get("evals", [])]
        self.done = bool(state.get("done", False))


def _trend(values: list[float]) -> tuple[float, float]:
    """The least-squares slope of ``values`` against their index, and its t statistic.

    >>> slope, t = _trend([3.0, 2.9, 2.8, 2.75, 2.6])
    >>> round(slope, 3), t < -10
    (-0.095, True)
    """
    n = len(values)
    if n < 3:
        return 0.0, 0.0
    mx, my = (n - 1) / 2, statistics.fmean(values)
    sxx = sum((i - mx) ** 2 for i in range(n))
    slope = sum((i - mx) * (v - my) for i, v in enumerate(values)) / sxx
    resid = sum((v - my - slope * (i - mx)) ** 2 for i, v in enumerate(values))
    se = math.sqrt(resid / (n - 2) / sxx)
    if se == 0:
        return slope, -math.inf if slope < 0 else (math.inf if slope > 0 else 0.0)
    return slope, slope / se
