"""Z-scores of the training loss and of the learning rate against a recent window."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from smart_monitor.batch import Floats, TrainBlock, rolling_mean, rolling_mean_std
from smart_monitor.config import LossZScoreConfig, LrZScoreConfig, TextureConfig
from smart_monitor.detectors.loss import first_hit
from smart_monitor.detectors.texture import Texture
from smart_monitor.notes import Note
from smart_monitor.records import Record, TrainRecord
from smart_monitor.stats import Relearn, RollingWindow
from smart_monitor.triggers import Severity, Trigger

__all__ = ["LossZScore", "LrZScore"]


def _min_move(min_rise: float, scale: float | None) -> float:
    """The smallest rise worth an alarm: ``min_rise`` of the starting loss. A loss that
    starts at 0 (a policy-gradient loss is about 0 by construction) gives no scale to
    measure a rise against, so it never alarms."""
    if scale is None or scale < 1e-12:
        return math.inf
    return min_rise * scale


class LossZScore:
    """Fires when the loss is ``threshold`` standard deviations above its recent window
    (``direction = "both"``: below too) and has moved by ``min_rise`` of the run's
    starting loss.

    A spike is a warning whatever its z: most are one bad batch, back on trend the next
    record. Only a loss that stays up for ``relearn`` records with z above ``critical``
    is critical (the policy escalates its incident).

    Why each guard: the std has a floor (``min_rel_std`` of the mean), so a flat loss
    cannot give an infinite z; a value that fires stays out of the window, so a spike
    cannot hide the next one; ``relearn`` firings in a row are a new level, not an
    outlier, and become the baseline; and ``min_rise`` is a share of the loss the run
    started at (the window's mean when warm-up ended), so a run that memorised its data
    down to 0.0002 does not alarm on 0.0002 -> 0.002 (real runs do that all the time).

    >>> d = LossZScore(LossZScoreConfig(window=8, warmup=8))
    >>> for i, v in enumerate([0.72, 0.71, 0.73, 0.70, 0.72, 0.71, 0.73, 0.72]):
    ...     assert not d.update(TrainRecord(i, v, None, None, {}))
    >>> d.update(TrainRecord(8, 1.15, None, None, {}))[0].name
    'loss_zscore_44.67'
    """

    kind = "loss_zscore"

    def __init__(self, config: LossZScoreConfig, texture: TextureConfig | None = None) -> None:
        self.config = config
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.texture = Texture(texture or TextureConfig())
        self.window = RollingWindow(config.window)
        self.scale: float | None = None
        self.streak = Relearn(config.relearn)
        self._min_move = math.inf  # min_rise * scale, once warm
        self._last: tuple[float, float, float, float, int] | None = None  # loss, mean, ...

    @property
    def last_z(self) -> float | None:
        """The z of the last scored value (metadata ``z_scores``), computed on demand:
        most records never need their square root."""
        if self._last is None:
            return None
        loss, mean, floor, m2, n = self._last
        return (loss - mean) / max(math.sqrt(max(m2, 0.0) / n), floor)

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, TrainRecord):
            return []
        loss = record.loss
        if loss is None or not -math.inf < loss < math.inf:
            return []
        window = self.window
        config = self.config
        n = len(window)
        if n < config.warmup:
            self.texture.start(record.step)
            window.add(record.step, loss)
            return []
        mean = window.mean
        if self.scale is None:
            self.scale = abs(mean)
            self._min_move = _min_move(config.min_rise, self.scale)
        floor = max(config.min_rel_std * abs(mean), 1e-12)
        self._last = (loss, mean, floor, window.m2, n)  # the window as it scored this value
        move = loss - mean if config.direction == "up" else abs(loss - mean)
        if move <= self._min_move:  # the fast path: not even the minimum rise
            self.streak.clear()
            window.add(record.step, loss)
            return []
        std = max(window.std, floor)
        z = (loss - mean) / std
        if move <= config.threshold * std:
            self.streak.clear()
            window.add(record.step, loss)
            return []
        place = self.streak.fire(record.step, loss, window)
        first = place == 1  # not yet seen to stay up: judged as texture
        persistent = place >= config.relearn  # the loss did not come back
        critical = persistent and abs(z) > config.critical
        severity = Severity.CRITICAL if critical else Severity.WARNING
        details: dict[str, Any] = {"z": z, "value": loss, "mean": mean, "std": std}
        if loss > mean > 0 and first:  # a rise not yet seen to stay: is it texture?
            severity, texture = self.texture.judge(record.step, loss / mean, severity, z)
            details.update(texture)
        return [Trigger(self.kind, f"{self.kind}_{z:.2f}", severity, record.step, details)]

    def screen(self, block: TrainBlock, start: int, stop: int) -> int:
        """Candidates: a move past ``min_rise`` of the starting loss and past
        ``threshold`` standard deviations (``update``'s two quiet paths), with slack
        for the rounding of the cumulative sums against the rolling Welford sums."""
        if block.loss is None:
            return stop
        config = self.config
        if len(self.window) < config.warmup or self.scale is None or self.streak:
            return start
        if self._min_move == math.inf:
            return stop
        values = block.loss[start:stop]
        means, stds = rolling_mean_std(self.window.values(), values, config.window)
        move = values - means if config.direction == "up" else np.abs(values - means)
        slack = 1e-9 * (np.abs(means) + self._min_move)
        floor = np.maximum(config.min_rel_std * np.abs(means), 1e-12)
        limit = config.threshold * np.maximum(stds, floor) * (1 - 1e-6)
        return first_hit((move > self._min_move - slack) & (move > limit - slack), start, stop)

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        if block.loss is None or start >= end:
            return
        self.texture.start(block.rows[start][0])
        window = self.window
        window.extend(*block.tail(block.loss, start, end - 1, window.size))
        loss = float(block.loss[end - 1])  # the last one as ``update`` takes it: scored
        if len(window) >= self.config.warmup and self.scale is not None:
            mean = window.mean
            floor = max(self.config.min_rel_std * abs(mean), 1e-12)
            self._last = (loss, mean, floor, window.m2, len(window))
        window.add(block.rows[end - 1][0], loss)

    def rewind(self, step: int) -> None:
        self.window.rewind(step)
        self.texture.rewind(step)
        self.streak.rewind(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window.state_dict(),
            "texture": self.texture.state_dict(),
            "scale": self.scale,
            "streak": self.streak.state_dict(),
            "last": list(self._last) if self._last else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state.get("window", {}))
        self.texture.load_state_dict(state.get("texture", {}))
        self.scale = state.get("scale")
        self.streak.load_state_dict(state.get("streak", []))
        last = state.get("last")
        self._last = None
        if last and len(last) == 5:
            loss, mean, floor, m2, n = last
            self._last = (float(loss), float(mean), float(floor), float(m2), int(n))
        self._min_move = _min_move(self.config.min_rise, self.scale)


class LrZScore:
    """Fires when the learning rate leaves its schedule.

    A schedule (warm-up, cosine, linear, warmup-stable-decay) moves the LR by a smoothly
    changing amount per step, so the detector scores the per-step change against the
    recent changes, not the value against recent values: the planned ramp and decay are
    not anomalies, a reset to peak, a x10 or a collapse are. The std of the changes has
    a floor of ``min_rel_std`` of the LR per record, so a constant LR (std 0) or the
    kink where warm-up ends cannot give an infinite z.

    A value that fires is held aside: if the next record is back on the schedule, it
    was a one-step glitch; if it follows on from the held value, the LR moved to a new
    level (a restart, a collapse), which becomes the schedule, so one problem is one
    detection, not one per record.

    What the schedule explains is no alarm but an ``LR changed`` note (in ``notes``,
    which the pipeline drains): a drop to at least ``planned_drop`` of the LR (step,
    multi-step and plateau schedules cut by 0.1-0.5), a change within the logged
    precision (1e-6 -> 0 at the end of a decay printed with 6 decimals) and, with
    ``schedule = "cyclic"``, a rise back up to the peak. A rise after the LR left its
    peak (a scheduler reset on resume) and a jump of an order of magnitude are critical.

    >>> d = LrZScore(LrZScoreConfig())
    >>> out = [d.update(TrainRecord(s, None, 2e-4, None, {})) for s in range(1, 30)]
    >>> d.update(TrainRecord(30, None, 2e-3, None, {}))[0].name
    'lr_zscore_180.00'
    >>> d.update(TrainRecord(31, None, 2e-4, None, {}))
    []
    """

    kind = "lr_zscore"

    def __init__(self, config: LrZScoreConfig) -> None:
        self.config = config
        self.window = RollingWindow(config.window)
        self.last: tuple[int, float] | None = None
        self.held: tuple[int, float] | None = None
        self.peak = 0.0  # the highest LR seen: a rise below it after a decay is a reset
        self.notes: list[Note] = []
        self._scored: tuple[int, float, int, float] | None = None  # step, lr, since

    @property
    def last_z(self) -> float | None:
        """The z of the last scored value (metadata ``z_scores``), computed on demand."""
        if self._scored is None:
            return None
        step, lr, since_step, since_lr = self._scored
        return self._z(step, lr, (since_step, since_lr))

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, TrainRecord):
            return []
        lr = record.learning_rate
        if lr is None or not -math.inf < lr < math.inf:
            return []
        step = record.step
        last = self.last
        if last is None or step <= last[0]:
            self.last = (step, lr)
            self.peak = max(self.peak, lr)
            return []
        config = self.config
        if len(self.window) < config.warmup:
            self._accept(step, lr)
            return []
        self._scored = (step, lr, *last)
        # the fast path: within threshold * the std floor, so within threshold of any std
        dt = step - last[0]
        if abs(lr - last[1] - self.window.mean * dt) <= config.threshold * config.min_rel_std * abs(
            last[1]
        ):
            self.held = None
            self._accept(step, lr)
            return []
        z = self._z(step, lr, last)
        if abs(z) <= config.threshold:
            self.held = None
            self._accept(step, lr)
            return []
        held, self.held = self.held, (step, lr)
        if held is not None and abs(self._z(step, lr, held)) <= config.threshold:
            self.last, self.held = held, None  # the held value was a new level
            self._accept(step, lr)
            return []
        reason = self._planned(lr, last[1])
        if reason:
            self.held, self.last = None, (step, lr)  # the new level; its jump is no rate
            self.peak = max(self.peak, lr)
            fields = {"step": step, "previous": last[1], "value": lr, "reason": reason}
            self.notes.append(Note("LR changed", "info", fields))
            return []
        expected = last[1] + self.window.mean * dt
        ratio = lr / last[1] if last[1] > 0 else math.inf
        severe = abs(z) > config.critical or not 0.1 < ratio < 10 or (lr > last[1] < self.peak)
        severity = Severity.CRITICAL if severe else Severity.WARNING
        details = {"z": z, "value": lr, "expected": expected}
        return [Trigger(self.kind, f"{self.kind}_{z:.2f}", severity, step, details)]

    def _planned(self, lr: float, previous: float) -> str:
        """Why the schedule explains a change from ``previous`` to ``lr`` ("" if not)."""
        units = [_resolution(v) for v in (lr, previous) if v != 0]  # a 0 says nothing
        unit = min(units, default=0.0)
        if abs(lr - previous) <= unit and min(abs(lr), abs(previous)) <= 2 * unit:
            return "precision"  # one printed unit, at the edge of the printed digits
        if previous * self.config.planned_drop <= lr < previous:
            return "decay"
        if self.config.schedule == "cyclic" and previous < lr <= self.peak:
            return "cycle"
        return ""

    def _z(self, step: int, lr: float, since: tuple[int, float]) -> float:
        dt = step - since[0]
        rate = (lr - since[1]) / dt
        std = max(self.window.std, self.config.min_rel_std * abs(since[1]) / dt, 1e-30)
        return (rate - self.window.mean) / std

    def _accept(self, step: int, lr: float) -> None:
        assert self.last is not None
        self.window.add(step, (lr - self.last[1]) / (step - self.last[0]))
        self.last = (step, lr)
        self.peak = max(self.peak, lr)

    def _rates(self, block: TrainBlock, start: int, end: int) -> tuple[Floats, ...]:
        """The LR, the previous accepted LR, the step gap and the per-step change of
        each record, as ``_accept`` would compute them if all were quiet."""
        assert block.learning_rate is not None and self.last is not None
        values = block.learning_rate[start:end]
        steps = block.steps[start:end]
        prev_lr = np.concatenate([[self.last[1]], values[:-1]])
        gap = steps - np.concatenate([[self.last[0]], steps[:-1]])
        return values, prev_lr, gap, (values - prev_lr) / gap

    def screen(self, block: TrainBlock, start: int, stop: int) -> int:
        """Candidates: off the recent per-step change by more than the fast path of
        ``update`` allows (``threshold`` times the std floor)."""
        if block.learning_rate is None:
            return stop
        config, last = self.config, self.last
        if last is None or self.held is not None or len(self.window) < config.warmup:
            return start
        if block.rows[start][0] <= last[0]:
            return start
        values, prev_lr, gap, rates = self._rates(block, start, stop)
        means = rolling_mean(self.window.values(), rates, config.window)
        off = np.abs(values - prev_lr - means * gap)
        limit = config.threshold * config.min_rel_std * np.abs(prev_lr)
        return first_hit(off > limit * (1 - 1e-9) - 1e-300, start, stop)

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        if block.learning_rate is None or start >= end:
            return
        first = max(start, end - self.window.size)  # all the window keeps of the rates
        if first > start:
            self.last = (block.rows[first - 1][0], float(block.learning_rate[first - 1]))
        *_, rates = self._rates(block, first, end)
        before = self.last  # the accepted LR before the last record, which it is scored
        if end - 1 > first:  # against (as ``update`` does when the window is warm)
            before = (block.rows[end - 2][0], float(block.learning_rate[end - 2]))
        warm = min(self.window.size, len(self.window) + end - start - 1) >= self.config.warmup
        self.window.extend([r[0] for r in block.rows[first:end]], rates.tolist())
        self.last = (block.rows[end - 1][0], float(block.learning_rate[end - 1]))
        if warm and before is not None:
            self._scored = (*self.last, *before)
        self.peak = max(self.peak, float(block.learning_rate[start:end].max()))
        self.held = None

    def rewind(self, step: int) -> None:
        self.window.rewind(step)
        if self.last is not None and self.last[0] > step:
            self.last = None
        if self.held is not None and self.held[0] > step:
            self.held = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window.state_dict(),
            "last": list(self.last) if self.last else None,
            "held": list(self.held) if self.held else None,
            "scored": list(self._scored) if self._scored else None,
            "peak": self.peak,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state.get("window", {}))
        last, held = state.get("last"), state.get("held")
        self.last = (int(last[0]), float(last[1])) if last else None
        self.held = (int(held[0]), float(held[1])) if held else None
        sc = state.get("scored")
        self._scored = (int(sc[0]), float(sc[1]), int(sc[2]), float(sc[3])) if sc else None
        self.peak = float(state.get("peak", 0.0))


def _resolution(value: float) -> float:
    """The unit of the last decimal a logged value was printed with: 1e-06 for 1e-06
    and 3e-06, 0.0001 for 0.0001, 1 for 20.0; 0 for a value printed in full.

    >>> _resolution(3e-06), _resolution(20.0), _resolution(0.000123456789123)
    (1e-06, 1.0, 0.0)
    """
    if value == 0 or not math.isfinite(value):
        return 0.0
    for decimals in range(13):
        if abs(round(value, decimals) - value) <= 1e-9 * abs(value):
            return 10.0**-decimals if abs(value) * 10**decimals < 1000 else 0.0
    return 0.0
