"""Loss spikes, slow divergence, and non-finite loss or gradient norm."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from smart_monitor.batch import Floats, TrainBlock, rolling_median, window_medians
from smart_monitor.config import DivergenceConfig, LossSpikeConfig, NonFiniteConfig, TextureConfig
from smart_monitor.detectors.base import IgnoresTrainBlocks
from smart_monitor.detectors.texture import Texture
from smart_monitor.notes import Note
from smart_monitor.records import Record, TrainRecord
from smart_monitor.stats import Relearn, RollingMedian
from smart_monitor.triggers import Severity, Trigger

__all__ = ["Divergence", "LossSpike", "NonFinite", "first_hit"]

_MAD_TO_STD = 1.4826  # MAD times this is the std of a normal sample
_NOISE_SE = 6.0  # standard errors of the rolling median a divergence must rise beyond: the
# lowest and the highest of many medians of one noisy level lie about 3 apart each way


class LossSpike:
    """Fires when the loss is more than ``threshold_pct`` above its rolling median and
    has risen by ``min_rise`` of the run's starting loss (the median when warm-up
    ended): a percentage of a near-zero loss means nothing (0.0001 -> 0.0002 is "+100 %"
    at 4-decimal rounding). The rise must also be ``min_robust_z`` robust standard
    deviations (1.4826 MAD): in a noisy late phase a doubling is only noise. A value
    that fires stays out of the median; ``relearn`` firings in a row are a new level
    and join it.

    >>> d = LossSpike(LossSpikeConfig(window=4, warmup=4, threshold_pct=50))
    >>> for i, v in enumerate([1.0, 1.02, 0.98, 1.0]):
    ...     assert not d.update(TrainRecord(i, v, None, None, {}))
    >>> d.update(TrainRecord(4, 1.873, None, None, {}))[0].name
    'loss_spike_87.3pct'
    """

    kind = "loss_spike"

    def __init__(self, config: LossSpikeConfig, texture: TextureConfig | None = None) -> None:
        self.config = config
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.last_z: float | None = None  # no z-score
        self.texture = Texture(texture or TextureConfig())
        self.baseline = RollingMedian(config.window)
        self.scale: float | None = None
        self.streak = Relearn(config.relearn)

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, TrainRecord):
            return []
        loss = record.loss
        if loss is None or not -math.inf < loss < math.inf:
            return []
        baseline = self.baseline
        config = self.config
        if len(baseline) < config.warmup:
            self.texture.start(record.step)
            baseline.add(record.step, loss)
            return []
        median = baseline.median
        if self.scale is None:
            self.scale = abs(median)
        rise = loss - median
        if (
            median <= 0  # a percentage of a non-positive baseline means nothing
            or rise * 100.0 <= config.threshold_pct * median
            or rise <= config.min_rise * self.scale
            or rise <= config.min_robust_z * _MAD_TO_STD * baseline.mad
        ):
            self.streak.clear()
            baseline.add(record.step, loss)
            return []
        pct = (loss / median - 1.0) * 100.0
        first = self.streak.fire(record.step, loss, baseline) == 1  # not yet seen to stay
        severity, details = Severity.WARNING, {"pct": pct, "value": loss, "baseline": median}
        if first:
            severity, texture = self.texture.judge(record.step, loss / median, severity)
            details.update(texture)
        return [Trigger(self.kind, f"{self.kind}_{pct:.1f}pct", severity, record.step, details)]

    def screen(self, block: TrainBlock, start: int, stop: int) -> int:
        """Candidates: above the median by threshold_pct and by min_rise (the robust-z
        condition is left to ``update``, which only makes the screen wider)."""
        if block.loss is None:
            return stop
        baseline, config = self.baseline, self.config
        if len(baseline) < baseline.size or self.scale is None or self.streak:
            return start
        values = block.loss[start:stop]
        # a median is at least the lowest value of its window: when even the highest
        # loss is not threshold_pct above the lowest value there is, no record can
        # fire and the medians (a sort of every window) are not needed. Rounding keeps
        # the order of the exact test below, so the bound never hides a candidate
        low = min(baseline.span[0], float(values.min()))
        if low > 0 and (float(values.max()) - low) * 100.0 <= config.threshold_pct * low:
            return stop
        median = rolling_median(baseline.values(), values, baseline.size, include=False)
        rise = values - median
        hit = (median > 0) & (rise * 100.0 > config.threshold_pct * median) & (
            rise > config.min_rise * self.scale
        )
        return first_hit(hit, start, stop)

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        if block.loss is not None and start < end:
            self.texture.start(block.rows[start][0])
            self.baseline.extend(*block.tail(block.loss, start, end, self.baseline.size))

    def rewind(self, step: int) -> None:
        self.baseline.rewind(step)
        self.texture.rewind(step)
        self.streak.rewind(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline.state_dict(),
            "texture": self.texture.state_dict(),
            "scale": self.scale,
            "streak": self.streak.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline.load_state_dict(state.get("baseline", {}))
        self.texture.load_state_dict(state.get("texture", {}))
        self.scale = state.get("scale")
        self.streak.load_state_dict(state.get("streak", []))


class Divergence:
    """Fires once when the rolling median of the loss has stayed ``factor`` times above
    its best (and ``min_rise`` of the starting loss above it) for ``patience``
    consecutive records: a run that is going away, not a bad batch. The median, unlike
    a mean, does not move for isolated spikes; it re-arms once the loss comes back.

    >>> d = Divergence(DivergenceConfig(window=5, warmup=5, patience=3))
    >>> losses = [1.0] * 10 + [1.0 + 0.1 * i for i in range(1, 20)]
    >>> [t.step for i, v in enumerate(losses) for t in d.update(TrainRecord(i, v, None, None, {}))]
    [19]
    """

    kind = "divergence_detected"

    def __init__(self, config: DivergenceConfig) -> None:
        self.config = config
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.last_z: float | None = None  # no z-score
        self.median = RollingMedian(config.window)
        self.best = math.inf
        self.scale: float | None = None
        self.seen = 0
        self.above = 0
        self.fired = False
        self._screened: tuple[TrainBlock, int, int, Floats] | None = None  # see _levels

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, TrainRecord):
            return []
        loss = record.loss
        if loss is None or not -math.inf < loss < math.inf:
            return []
        self.median.add(record.step, loss)
        self.seen += 1
        if self.seen < self.config.warmup:
            return []
        level = self.median.median
        if self.scale is None:
            self.scale = abs(level)
        best = self.best
        if not (
            0 < best < math.inf
            and level > best * self.config.factor
            and level - best > max(self.config.min_rise * self.scale, self._noise())
        ):
            self.above = 0
            self.fired = False
            if level < best:
                self.best = level
            return []
        self.above += 1
        if self.above < self.config.patience or self.fired:
            return []
        self.fired = True
        details = {"smoothed": level, "best": best, "ratio": level / best}
        return [Trigger(self.kind, self.kind, Severity.CRITICAL, record.step, details)]

    def _noise(self) -> float:
        """How far the lowest of many rolling medians of a noisy loss falls below its
        level by chance: the median's standard error (1.2533 sigma / sqrt(n), sigma from
        the window's MAD), times ``_NOISE_SE``. A per-step loss with heavy tails (a
        fine-tune's lucky batches) has a noisy median; its best is no baseline to
        diverge from by ``factor`` alone."""
        n = len(self.median)
        return _NOISE_SE * 1.2533 * _MAD_TO_STD * self.median.mad / math.sqrt(n) if n else 0.0

    def screen(self, block: TrainBlock, start: int, stop: int) -> int:
        if block.loss is None:
            return stop
        median, config = self.median, self.config
        if self.seen < config.warmup or self.scale is None or self.above or (
            len(median) < median.size
        ):
            return start
        # a median lies between the lowest and the highest value of its window, so
        # the best median from here on is at least the lowest value there is: when
        # even the highest is not ``factor`` times that (or the best so far), no
        # record can fire and the medians are not needed (rounding keeps the order)
        values = block.loss[start:stop]
        (lowest, highest), factor = median.span, config.factor
        low = min(self.best, lowest, float(values.min()))
        if low > 0 and max(highest, float(values.max())) <= low * factor:
            return stop
        # the same record by record (a long stretch of a falling loss spans more than
        # ``factor``): the highest value of each window against the lowest up to it
        joined = np.concatenate([np.asarray(median.values(), np.float64), values])
        size = median.size  # the window after record j is joined[j + 1 : j + 1 + size]
        highs = np.lib.stride_tricks.sliding_window_view(joined, size)[1:].max(axis=1)
        lows = np.minimum(self.best, np.minimum.accumulate(joined)[size:])
        if lows.min() > 0 and (highs <= lows * factor).all():
            return stop
        levels = self._levels(block, start, stop)
        best = np.minimum.accumulate(np.concatenate([[self.best], levels[:-1]]))
        finite = (best > 0) & (best < math.inf)
        hit = finite & (levels > best * config.factor) & (
            levels - best > config.min_rise * self.scale
        )
        return first_hit(hit, start, stop)

    def _levels(self, block: TrainBlock, start: int, end: int) -> Floats:
        """The median after each record of ``[start, end)``. The median takes in every
        loss, fired or not, so the levels a screen computed serve the absorbs that
        follow it, as long as exactly the records between were consumed."""
        assert block.loss is not None
        cached = self._cached(block, start, end)
        if cached is not None:
            return cached
        values = block.loss[start:end]
        levels = rolling_median(self.median.values(), values, self.median.size, include=True)
        self._screened = (block, start, self.seen, levels)
        return levels

    def _cached(self, block: TrainBlock, start: int, end: int) -> Floats | None:
        """The levels of ``[start, end)`` if the last screen computed them."""
        cached = self._screened
        if cached is not None and cached[0] is block:
            _, first, seen, levels = cached
            if self.seen - seen == start - first and end - first <= len(levels):
                return levels[start - first : end - first]
        return None

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        if block.loss is None or start >= end:
            return
        self.best = min(self.best, self._lowest_level(block, start, end))
        self.median.extend(*block.tail(block.loss, start, end, self.median.size))
        self.seen += end - start
        self.above = 0
        self.fired = False

    def _lowest_level(self, block: TrainBlock, start: int, end: int) -> float:
        """The lowest median after the records of ``[start, end)`` if it is below the
        best, else the best. Only the windows with at least half their values below the
        best can have their median below it; the others are not sorted."""
        assert block.loss is not None
        cached = self._cached(block, start, end)
        if cached is not None:
            return float(cached.min())
        history, size = self.median.values(), self.median.size
        joined = np.concatenate([np.asarray(history, np.float64), block.loss[start:end]])
        below = np.concatenate([[0], np.cumsum(joined < self.best)])
        n = end - start  # the window after record j is joined[j + 1 : j + 1 + size]
        counts = below[size + 1 : size + 1 + n] - below[1 : 1 + n]
        windows = np.flatnonzero(counts >= size - size // 2)
        if not len(windows):
            return self.best
        return float(window_medians(joined, size, windows + 1).min())

    def rewind(self, step: int) -> None:
        self.median.rewind(step)
        self.above = 0
        self.fired = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "median": self.median.state_dict(),
            "best": None if math.isinf(self.best) else self.best,
            "scale": self.scale,
            "seen": self.seen,
            "above": self.above,
            "fired": self.fired,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.median.load_state_dict(state.get("median", {}))
        best = state.get("best")
        self.best = math.inf if best is None else float(best)
        self.scale = state.get("scale")
        self.seen = int(state.get("seen", 0))
        self.above = int(state.get("above", 0))
        self.fired = bool(state.get("fired", False))


class NonFinite(IgnoresTrainBlocks):
    """NaN or infinite loss (critical); NaN or infinite gradient norm, which is where HF
    shows a NaN when it filters the logged loss: a warning for an isolated step (fp16
    loss scaling skips it and carries on), critical when it repeats within
    ``grad_norm_repeat_steps`` or the loss is non-finite too.

    >>> d = NonFinite(NonFiniteConfig())
    >>> [(t.name, t.severity.value) for t in d.update(TrainRecord(5, 0.7, None, math.nan, {}))]
    [('grad_norm_nonfinite', 'warning')]
    >>> [t.severity.value for t in d.update(TrainRecord(9, 0.7, None, math.inf, {}))]
    ['critical']
    """

    def __init__(self, config: NonFiniteConfig) -> None:
        self.config = config
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.last_z: float | None = None  # no z-score
        self.last_bad_grad: int | None = None

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, TrainRecord):
            return []
        loss, grad = record.loss, record.grad_norm
        loss_bad = loss is not None and not math.isfinite(loss)
        grad_bad = grad is not None and not math.isfinite(grad)
        if not (loss_bad or grad_bad):
            return []
        out: list[Trigger] = []
        if loss_bad:
            details = {"value": repr(loss)}
            out.append(
                Trigger("loss_nonfinite", "loss_nonfinite", Severity.CRITICAL, record.step, details)
            )
        if grad_bad:
            last = self.last_bad_grad
            repeated = (
                last is not None and 0 < record.step - last <= self.config.grad_norm_repeat_steps
            )
            severity = Severity.CRITICAL if repeated or loss_bad else Severity.WARNING
            info = {"value": repr(grad), "previous_nonfinite_step": last}
            out.append(
                Trigger(
                    "grad_norm_nonfinite", "grad_norm_nonfinite", severity, record.step, info
                )
            )
            self.last_bad_grad = record.step
        return out

    def rewind(self, step: int) -> None:
        if self.last_bad_grad is not None and self.last_bad_grad > step:
            self.last_bad_grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"last_bad_grad": self.last_bad_grad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_bad_grad = state.get("last_bad_grad")


def first_hit(hit: npt.NDArray[np.bool_], start: int, stop: int) -> int:
    """The block index of the first True in ``hit`` (which starts at ``start``)."""
    found = np.flatnonzero(hit)
    return start + int(found[0]) if len(found) else stop
