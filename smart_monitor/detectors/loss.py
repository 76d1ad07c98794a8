"""Loss spikes, slow divergence, and non-finite loss or gradient norm."""

from __future__ import annotations

import math
from typing import Any

from ..config import DivergenceConfig, LossSpikeConfig, NonFiniteConfig
from ..records import Record, TrainRecord
from ..stats import RollingMedian
from ..triggers import Severity, Trigger
from .base import isfinite

__all__ = ["Divergence", "LossSpike", "NonFinite"]


class LossSpike:
    """Fires when the loss is more than ``threshold_pct`` above its rolling median.

    >>> d = LossSpike(LossSpikeConfig(window=4, warmup=4))
    >>> for i, v in enumerate([1.0, 1.02, 0.98, 1.0]):
    ...     assert not d.update(TrainRecord(i, v, None, None, {}))
    >>> d.update(TrainRecord(4, 1.873, None, None, {}))[0].name
    'loss_spike_87.3pct'
    """

    kind = "loss_spike"

    def __init__(self, config: LossSpikeConfig) -> None:
        self.config = config
        self.baseline = RollingMedian(config.window)

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, TrainRecord) or not isfinite(record.loss):
            return []
        loss = float(record.loss)  # type: ignore[arg-type]
        if len(self.baseline) >= self.config.warmup:
            median = self.baseline.median
            if median > 0:
                pct = (loss / median - 1.0) * 100.0
                if pct > self.config.threshold_pct:
                    details = {"pct": pct, "value": loss, "baseline": median}
                    name = f"{self.kind}_{pct:.1f}pct"
                    return [Trigger(self.kind, name, Severity.WARNING, record.step, details)]
        self.baseline.add(record.step, loss)
        return []

    def rewind(self, step: int) -> None:
        self.baseline.rewind(step)

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline.load_state_dict(state.get("baseline", {}))


class Divergence:
    """Fires once when the smoothed loss has stayed ``factor`` times above its best for
    ``patience`` consecutive records: a run that is going away, not a bad batch."""

    kind = "divergence_detected"

    def __init__(self, config: DivergenceConfig) -> None:
        self.config = config
        self.ewma: float | None = None
        self.best = math.inf
        self.seen = 0
        self.above = 0
        self.fired = False

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, TrainRecord) or not isfinite(record.loss):
            return []
        loss = float(record.loss)  # type: ignore[arg-type]
        a = self.config.alpha
        self.ewma = loss if self.ewma is None else a * loss + (1 - a) * self.ewma
        self.seen += 1
        if self.seen < self.config.warmup:
            self.best = min(self.best, self.ewma)
            return []
        if self.ewma > self.best * self.config.factor:
            self.above += 1
        else:
            self.above = 0
            self.fired = False
            self.best = min(self.best, self.ewma)
        if self.above >= self.config.patience and not self.fired:
            self.fired = True
            details = {"smoothed": self.ewma, "best": self.best, "ratio": self.ewma / self.best}
            return [Trigger(self.kind, self.kind, Severity.CRITICAL, record.step, details)]
        return []

    def rewind(self, step: int) -> None:
        self.above = 0
        self.fired = False

    def state_dict(self) -> dict[str, Any]:
        return {
            "ewma": self.ewma,
            "best": None if math.isinf(self.best) else self.best,
            "seen": self.seen,
            "above": self.above,
            "fired": self.fired,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ewma = state.get("ewma")
        best = state.get("best")
        self.best = math.inf if best is None else float(best)
        self.seen = int(state.get("seen", 0))
        self.above = int(state.get("above", 0))
        self.fired = bool(state.get("fired", False))


class NonFinite:
    """NaN or infinite loss (critical); NaN or infinite gradient norm, which is where HF
    shows a NaN when it filters the logged loss: a warning for an isolated step (fp16
    loss scaling skips it and carries on), critical when it repeats within
    ``grad_norm_repeat_steps`` or the loss is non-finite too."""

    def __init__(self, config: NonFiniteConfig) -> None:
        self.config = config
        self.last_bad_grad: int | None = None

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, TrainRecord):
            return []
        out: list[Trigger] = []
        loss_bad = record.loss is not None and not math.isfinite(record.loss)
        if loss_bad:
            details = {"value": repr(record.loss)}
            out.append(Trigger("loss_nonfinite", "loss_nonfinite", Severity.CRITICAL, record.step, details))
        if record.grad_norm is not None and not math.isfinite(record.grad_norm):
            last = self.last_bad_grad
            repeated = last is not None and record.step - last <= self.config.grad_norm_repeat_steps
            severity = Severity.CRITICAL if repeated or loss_bad else Severity.WARNING
            details = {"value": repr(record.grad_norm), "previous_nonfinite_step": last}
            out.append(Trigger("grad_norm_nonfinite", "grad_norm_nonfinite", severity, record.step, details))
            self.last_bad_grad = record.step
        return out

    def rewind(self, step: int) -> None:
        if self.last_bad_grad is not None and self.last_bad_grad > step:
            self.last_bad_grad = None

    def state_dict(self) -> dict[str, Any]:
        return {"last_bad_grad": self.last_bad_grad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_bad_grad = state.get("last_bad_grad")
