"""Triggers in, decisions out: severity, MULTIPLE_TRIGGERS and per-kind cooldowns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .config import PolicyConfig
from .triggers import Severity, Trigger

__all__ = ["MULTIPLE", "Decision", "Policy", "severity_of"]

MULTIPLE = "MULTIPLE_TRIGGERS"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with the triggers of one record: ``snapshot`` holds the triggers a
    snapshot is made for (empty: none), ``suppressed`` those inside their cooldown."""

    snapshot: tuple[Trigger, ...]
    suppressed: tuple[Trigger, ...]
    name: str
    severity: Severity


def severity_of(triggers: Sequence[Trigger]) -> Severity:
    """The highest severity; MULTIPLE_TRIGGERS with three or more is critical."""
    if len(triggers) >= 3:
        return Severity.CRITICAL
    return max((t.severity for t in triggers), key=lambda s: s.rank)


class Policy:
    """One incident, one snapshot: a kind that made a snapshot at step S makes no other
    before S + ``cooldown_steps``; the detections in between are still logged.

    >>> from .triggers import Trigger
    >>> p = Policy(PolicyConfig(cooldown_steps=100))
    >>> t = lambda s: Trigger("loss_spike", "loss_spike_90.0pct", Severity.WARNING, s)
    >>> p.decide(500, [t(500)]).name, len(p.decide(550, [t(550)]).suppressed)
    ('loss_spike_90.0pct', 1)
    """

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.last_snapshot: dict[str, int] = {}

    def decide(self, step: int, triggers: Sequence[Trigger]) -> Decision:
        fresh, cooling = [], []
        for t in triggers:
            last = self.last_snapshot.get(t.kind)
            if last is not None and 0 <= step - last < self.config.cooldown_steps:
                cooling.append(t)
            else:
                fresh.append(t)
        for t in fresh:
            self.last_snapshot[t.kind] = step
        if not fresh:
            return Decision((), tuple(cooling), "", severity_of(cooling))
        name = fresh[0].name if len(fresh) == 1 else MULTIPLE
        return Decision(tuple(fresh), tuple(cooling), name, severity_of(fresh))

    def rewind(self, step: int) -> None:
        """The trainer went back to ``step``: later snapshots belong to another segment."""
        self.last_snapshot = {k: s for k, s in self.last_snapshot.items() if s <= step}

    def state_dict(self) -> dict[str, Any]:
        return {"last_snapshot": dict(self.last_snapshot)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_snapshot = {str(k): int(v) for k, v in state.get("last_snapshot", {}).items()}
