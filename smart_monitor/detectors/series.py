"""Every loss series beside the main train loss, each watched with its own state.

The main train loss has the seed's detectors and names (``loss_nonfinite``, ...). Every
other loss series of a record (``smart_monitor/series.py`` says which keys are losses)
gets its own non-finite check, ``LossSpike`` and ``Divergence``, and its triggers carry
its filename-safe name in place of ``loss``: ``val_cls_loss_nonfinite``,
``train_gen_loss_spike_87.3pct`` (their kinds stay the seed's: ``loss_nonfinite``, ...).
The main eval loss (``eval_loss``) gets the non-finite check only: its rises are the
best model's and overfitting's to judge, as before.

A non-finite train loss is critical, as the main one. The series non-finite in one
record are one problem and one trigger, named for the first. A non-finite eval loss is
judged by its consequence: critical when it persists (the series' previous value was not
finite either) or when the evaluation collapsed with it (a higher-is-better eval metric
of the same record below half its best); a warning when the model's metrics are intact
(one bad batch in the loss computation, which the next evaluation shows recovered). An
eval loss that diverges is a warning: that is overfitting, which the run survives. While
the main train loss is non-finite, a non-finite eval loss is no news (``loss_nonfinite``
already said the run broke).
"""

from __future__ import annotations

import math
from operator import itemgetter
from typing import Any

from smart_monitor.batch import TrainBlock
from smart_monitor.config import DetectorsConfig
from smart_monitor.detectors.loss import Divergence, LossSpike
from smart_monitor.notes import Note
from smart_monitor.records import EvalRecord, Record, TrainRecord
from smart_monitor.series import classify, main_loss_key, safe_name
from smart_monitor.triggers import Severity, Trigger

__all__ = ["SeriesLosses"]

_RAW = itemgetter(4)  # a batch.Row's record
_COLLAPSE = 0.5  # an eval metric below this share of its best: the evaluation collapsed


class _Watched:
    """One loss series: its spike and divergence detectors, its last value's health."""

    def __init__(self, config: DetectorsConfig) -> None:
        self.spike = LossSpike(config.loss_spike) if config.loss_spike.enabled else None
        self.divergence = Divergence(config.divergence) if config.divergence.enabled else None
        self.bad_at: int | None = None  # step of the last non-finite value

    def state_dict(self) -> dict[str, Any]:
        return {
            "spike": self.spike.state_dict() if self.spike else {},
            "divergence": self.divergence.state_dict() if self.divergence else {},
            "bad_at": self.bad_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.spike:
            self.spike.load_state_dict(state.get("spike", {}))
        if self.divergence:
            self.divergence.load_state_dict(state.get("divergence", {}))
        self.bad_at = state.get("bad_at")


class SeriesLosses:
    """The loss series other than the main train loss, and the eval metrics' bests
    (for the consequence of a non-finite eval loss).

    >>> d = SeriesLosses(DetectorsConfig())
    >>> d.update(EvalRecord(1, 2.0, None, {"eval_loss": 2.0, "mAP50": 0.8}))
    []
    >>> [(t.name, t.severity.value) for t in d.update(
    ...     EvalRecord(2, None, None, {"val/cls_loss": math.nan, "mAP50": 0.7}))]
    [('val_cls_loss_nonfinite', 'warning')]
    >>> [(t.name, t.severity.value) for t in d.update(
    ...     EvalRecord(3, math.nan, None, {"eval_loss": math.nan, "mAP50": 0.1}))]
    [('eval_loss_nonfinite', 'critical')]
    """

    def __init__(self, config: DetectorsConfig) -> None:
        self.config = config
        self.series: dict[str, _Watched] = {}
        self.best: dict[str, tuple[float, int]] = {}  # eval metric -> (best, its step)
        self._keys: dict[tuple[str, ...], tuple[str, ...]] = {}  # record keys -> watched
        self.train_bad = False  # the main train loss is non-finite: the run is already broken
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.last_z: float | None = None  # no z-score of its own

    def _watched(self, raw: Any) -> tuple[str, ...]:
        """The keys of ``raw`` this detector watches (memoised on the key set)."""
        keys = tuple(raw)
        found = self._keys.get(keys)
        if found is None:
            if len(self._keys) >= 1024:  # a run whose keys keep changing: a bounded memo
                self._keys.clear()
            main = "loss" if "loss" in raw else main_loss_key(keys)
            found = self._keys[keys] = tuple(
                k for k in keys if k != main and classify(k).role == "loss"
            )
        return found

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, TrainRecord | EvalRecord):
            return []
        raw = record.raw
        evaluation = isinstance(record, EvalRecord)
        if isinstance(record, TrainRecord) and record.loss is not None:
            self.train_bad = not math.isfinite(record.loss)
        collapsed = self._metrics(record) if isinstance(record, EvalRecord) else None
        out: list[Trigger] = []
        bad: list[str] = []  # the series non-finite in this record: one problem, one trigger
        for key in self._watched(raw):
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, float | int):
                continue
            watched = self.series.get(key)
            if watched is None:
                watched = self.series[key] = _Watched(self.config)
            if not math.isfinite(value):
                bad.append(key)
                continue
            watched.bad_at = None
            if key == "eval_loss" or classify(key).adversarial:
                continue  # the main eval loss: best model and overfitting judge it, as
                # before; a GAN's losses are not minimised: only a non-finite one is news
            point = TrainRecord(record.step, float(value), None, None, raw)
            for detector in (watched.spike, watched.divergence):
                if detector is not None:
                    out.extend(_renamed(t, key, evaluation) for t in detector.update(point))
        if bad and evaluation and self.train_bad:
            bad = []  # the eval of a run whose train loss is NaN: loss_nonfinite says it
        if bad and self.config.nonfinite.enabled:
            out.append(self._nonfinite(record, bad, evaluation, collapsed))
        for key in bad:
            self.series[key].bad_at = record.step
        return out

    def _nonfinite(
        self, record: TrainRecord | EvalRecord, keys: list[str], evaluation: bool,
        collapsed: str | None,
    ) -> Trigger:
        """One trigger for the series non-finite at once (YOLO's three validation losses
        are one failed evaluation), named for the first; its severity by consequence."""
        first = keys[0]
        persists = any(self.series[k].bad_at is not None for k in keys)
        eval_series = evaluation or classify(first).split == "eval"
        critical = not eval_series or persists or collapsed is not None
        name = f"{safe_name(first)}_nonfinite"
        details = {"value": repr(record.raw[first]), "series": keys, "collapsed": collapsed,
                   "persists": persists}  # fmt: skip
        severity = Severity.CRITICAL if critical else Severity.WARNING
        return Trigger("loss_nonfinite", name, severity, record.step, details)

    def _metrics(self, record: EvalRecord) -> str | None:
        """Learn the bests of the record's higher-is-better eval metrics; the first one
        that collapsed below half its best (None: none did)."""
        collapsed = None
        for key, value in record.raw.items():
            if isinstance(value, bool) or not isinstance(value, float | int):
                continue
            series = classify(key)
            if series.role != "metric" or series.direction != "higher":
                continue
            if not math.isfinite(value):
                continue
            best = self.best.get(key)
            if best is None or value > best[0]:
                self.best[key] = (float(value), record.step)
            elif best[0] > 0 and value < _COLLAPSE * best[0] and collapsed is None:
                collapsed = key
        return collapsed

    def screen(self, block: TrainBlock, start: int, stop: int) -> int:
        """A train row with another loss series goes through ``update``; rows without
        one (the HF shape) leave nothing to learn."""
        if not self._watched(block.keys):
            return stop  # the common case (HF's shape): nothing watched in any row
        watched = self._watched
        for i, raw in enumerate(map(_RAW, block.rows[start:stop]), start):
            if watched(raw):
                return i
        return stop

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        if block.loss is not None:
            self.train_bad = False  # a block's losses are finite (batch.train_row)

    def rewind(self, step: int) -> None:
        for watched in self.series.values():
            for detector in (watched.spike, watched.divergence):
                if detector is not None:
                    detector.rewind(step)
            if watched.bad_at is not None and watched.bad_at > step:
                watched.bad_at = None
        self.best = {k: v for k, v in self.best.items() if v[1] <= step}

    def state_dict(self) -> dict[str, Any]:
        return {
            "series": {k: w.state_dict() for k, w in self.series.items()},
            "best": {k: list(v) for k, v in self.best.items()},
            "train_bad": self.train_bad,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.series = {}
        for key, saved in state.get("series", {}).items():
            watched = self.series[key] = _Watched(self.config)
            watched.load_state_dict(saved)
        self.best = {k: (float(v[0]), int(v[1])) for k, v in state.get("best", {}).items()}
        self.train_bad = bool(state.get("train_bad", False))


def _renamed(t: Trigger, key: str, evaluation: bool) -> Trigger:
    """The seed's trigger on a series: ``loss`` in its name becomes the series' name; its
    kind stays the seed's (cooldowns, incidents, on_triggers, the meanings table). An
    eval loss rising for good is overfitting, not a run going away: a warning."""
    name = f"{safe_name(key)}_{t.name.removeprefix('loss_')}"
    severity = Severity.WARNING if evaluation or classify(key).split == "eval" else t.severity
    return Trigger(t.kind, name, severity, t.step, {**t.details, "series": key})
