"""Whether a loss spike is news or the run's normal texture.

Healthy LM pretraining runs have one-step data blips of 1.1-1.6x, from almost none to
dozens per run (``real-runs/dev-lm``): a monitor that wakes someone for each is switched
off. So a spike that is neither large (``min_ratio`` of its baseline, or ``min_z``
standard deviations of a quiet window) nor rare for this run (blips at least as large
came less often than once per ``rare_steps``) is an ``info`` detection: still counted,
logged and summed up, never a warning. A spike that does not come back still turns
critical (the detectors' ``relearn``), whatever its size.
"""

from __future__ import annotations

from typing import Any

from smart_monitor.config import TextureConfig
from smart_monitor.stats import BlipHistory
from smart_monitor.triggers import Severity

__all__ = ["Texture"]


class Texture:
    """The run's history of loss blips and the judgement of a new one.

    >>> t = Texture(TextureConfig(min_ratio=1.5, rare_steps=1000))
    >>> t.start(0)
    >>> [t.judge(s, 2.0, Severity.WARNING)[0].value for s in (100, 400, 700, 5000)]
    ['warning', 'info', 'info', 'warning']
    >>> t.judge(800, 1.3, Severity.WARNING)[0].value
    'info'
    """

    def __init__(self, config: TextureConfig) -> None:
        self.config = config
        self.history = BlipHistory()

    def start(self, step: int) -> None:
        """The run's first step: return periods count from it."""
        self.history.start(step)

    def judge(
        self, step: int, ratio: float, severity: Severity, z: float | None = None
    ) -> tuple[Severity, dict[str, Any]]:
        """The severity of a spike ``ratio`` times its baseline at ``step`` (a critical
        one stays critical) and the figures that say how often this run does that."""
        count, period = self.history.judge(step, ratio)
        self.history.add(step, ratio)
        details: dict[str, Any] = {"ratio": ratio, "earlier_at_least": count,
                                   "return_period_steps": period}
        config = self.config
        if not config.enabled or severity is Severity.CRITICAL:
            return severity, details
        common = period is not None and period < config.rare_steps
        large = ratio >= config.min_ratio or (z is not None and z >= config.min_z)
        if not large or common:
            details["texture"] = True
            return Severity.INFO, details
        return severity, details

    def rewind(self, step: int) -> None:
        self.history.rewind(step)

    def state_dict(self) -> dict[str, Any]:
        return self.history.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state)
