"""Z-scores of the training loss and of the learning rate against a recent window."""

from __future__ import annotations

import math
from typing import Any

from ..config import LossZScoreConfig, LrZScoreConfig
from ..records import Record, TrainRecord
from ..stats import RollingWindow
from ..triggers import Severity, Trigger
from .base import isfinite

__all__ = ["LossZScore", "LrZScore"]


def _zscore(value: float, window: RollingWindow, min_rel_std: float) -> float:
    """``(value - mean) / std`` with a floor on std so a flat series cannot give inf."""
    std = max(window.std, min_rel_std * abs(window.mean), 1e-12)
    return (value - window.mean) / std


class LossZScore:
    """Fires when the loss is ``threshold`` standard deviations from its recent window.

    >>> d = LossZScore(LossZScoreConfig(window=8, warmup=8))
    >>> for i, v in enumerate([0.72, 0.71, 0.73, 0.70, 0.72, 0.71, 0.73, 0.72]):
    ...     assert not d.update(TrainRecord(i, v, None, None, {}))
    >>> d.update(TrainRecord(8, 1.15, None, None, {}))[0].name
    'loss_zscore_44.67'
    """

    kind = "loss_zscore"

    def __init__(self, config: LossZScoreConfig) -> None:
        self.config = config
        self.window = RollingWindow(config.window)
        self.last_z: float | None = None

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, TrainRecord) or not isfinite(record.loss):
            return []
        loss = float(record.loss)  # type: ignore[arg-type]
        if len(self.window) < self.config.warmup:
            self.window.add(record.step, loss)
            return []
        z = _zscore(loss, self.window, self.config.min_rel_std)
        self.last_z = z
        if abs(z) <= self.config.threshold:
            self.window.add(record.step, loss)
            return []
        severity = Severity.CRITICAL if abs(z) > self.config.critical else Severity.WARNING
        details = {"z": z, "value": loss, "mean": self.window.mean, "std": self.window.std}
        return [Trigger(self.kind, f"{self.kind}_{z:.2f}", severity, record.step, details)]

    def rewind(self, step: int) -> None:
        self.window.rewind(step)

    def state_dict(self) -> dict[str, Any]:
        return {"window": self.window.state_dict(), "last_z": self.last_z}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state.get("window", {}))
        self.last_z = state.get("last_z")


class LrZScore:
    """Fires when the learning rate leaves its schedule.

    A schedule (warm-up, cosine, linear decay) moves the LR by a smoothly changing
    amount per step, so the detector scores the per-step change against the recent
    changes, not the value against recent values: the planned ramp is not an anomaly,
    a reset to peak or a x10 is. The change is taken from the last accepted value, so
    one glitched step does not make its return to schedule look like a second glitch.
    """

    kind = "lr_zscore"

    def __init__(self, config: LrZScoreConfig) -> None:
        self.config = config
        self.window = RollingWindow(config.window)
        self.last: tuple[int, float] | None = None
        self.last_z: float | None = None

    def update(self, record: Record) -> list[Trigger]:
        if not isinstance(record, TrainRecord) or not isfinite(record.learning_rate):
            return []
        lr = float(record.learning_rate)  # type: ignore[arg-type]
        if self.last is None or record.step <= self.last[0]:
            self.last = (record.step, lr)
            return []
        last_step, last_lr = self.last
        rate = (lr - last_lr) / (record.step - last_step)
        if len(self.window) < self.config.warmup:
            self.window.add(record.step, rate)
            self.last = (record.step, lr)
            return []
        floor = self.config.min_rel_std * abs(last_lr) / max(1, record.step - last_step)
        std = max(self.window.std, floor, 1e-30)
        z = (rate - self.window.mean) / std
        self.last_z = z
        if abs(z) <= self.config.threshold or not math.isfinite(z):
            self.window.add(record.step, rate)
            self.last = (record.step, lr)
            return []
        severity = Severity.CRITICAL if abs(z) > self.config.critical else Severity.WARNING
        details = {"z": z, "value": lr, "expected": last_lr + self.window.mean * (record.step - last_step)}
        return [Trigger(self.kind, f"{self.kind}_{z:.2f}", severity, record.step, details)]

    def rewind(self, step: int) -> None:
        self.window.rewind(step)
        if self.last is not None and self.last[0] > step:
            self.last = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window.state_dict(),
            "last": list(self.last) if self.last else None,
            "last_z": self.last_z,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state.get("window", {}))
        last = state.get("last")
        self.last = (int(last[0]), float(last[1])) if last else None
        self.last_z = state.get("last_z")
