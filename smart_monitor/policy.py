"""Triggers in, decisions out: severity, MULTIPLE_TRIGGERS, incidents and cooldowns.

One problem, one snapshot: consecutive detections of one problem (``problem_of``: a
loss z-score and a loss spike are one problem) form an *incident*. Its first detection
makes the snapshot (the checkpoint before it went wrong is the one worth keeping); the
ones after it are logged and counted, and the incident keeps its peak. It recovers when
``recovery_steps`` pass without a detection of its problem.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from smart_monitor.config import PolicyConfig
from smart_monitor.triggers import Severity, Trigger, problem_of

__all__ = ["MULTIPLE", "Decision", "Incident", "Policy", "severity_of"]

MULTIPLE = "MULTIPLE_TRIGGERS"
_NO_INCIDENT = frozenset({"best_model_loss"})  # every new best is its own event


@dataclass(slots=True)
class Incident:
    """Consecutive detections of one problem. ``peak_*``: the strongest detection
    (highest severity, then largest abs z / pct / ratio)."""

    id: str
    problem: str
    started: int
    last: int
    peak_step: int
    peak_trigger: str
    peak_score: float
    detections: int = 1
    severity: str = Severity.WARNING.value

    def block(self) -> dict[str, Any]:
        """The ``incident`` block of ``metadata.json`` (``peak_score`` is internal)."""
        out = asdict(self)
        del out["peak_score"]
        return out


def _score(t: Trigger) -> float:
    d = t.details
    value = d.get("z", d.get("pct", d.get("ratio", 0.0)))
    magnitude = abs(float(value)) if isinstance(value, int | float) else 0.0
    return t.severity.rank * 1e12 + min(magnitude, 1e11)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with the triggers of one record: ``snapshot`` holds the triggers a
    snapshot is made for (empty: none), ``suppressed`` those that belong to an open
    incident or fall in their problem's cooldown; ``incidents`` the incidents the
    snapshot opens."""

    snapshot: tuple[Trigger, ...]
    suppressed: tuple[Trigger, ...]
    name: str
    severity: Severity
    incidents: tuple[Incident, ...] = ()


def severity_of(triggers: Sequence[Trigger]) -> Severity:
    """The highest severity; MULTIPLE_TRIGGERS with three or more is critical."""
    if len(triggers) >= 3:
        return Severity.CRITICAL
    return max((t.severity for t in triggers), key=lambda s: s.rank)


class Policy:
    """Incidents, then a cooldown: a problem that made a snapshot at step S makes no
    other before S + ``cooldown_steps``, even in a new incident.

    >>> from .triggers import Trigger
    >>> p = Policy(PolicyConfig(cooldown_steps=100, recovery_steps=50))
    >>> t = lambda s: Trigger("loss_spike", "loss_spike_190.0pct", Severity.WARNING, s)
    >>> p.decide(500, [t(500)]).name, len(p.decide(520, [t(520)]).suppressed)
    ('loss_spike_190.0pct', 1)
    >>> [(i.started, i.last, i.detections) for i in p.observe(571)]
    [(500, 520, 2)]
    """

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.last_snapshot: dict[str, int] = {}
        self.open: dict[str, Incident] = {}
        self._due: int | None = None  # the first step at which an open incident recovers

    @property
    def due(self) -> int | None:
        """The first step at which ``observe`` may close an incident."""
        return self._due

    def observe(self, step: int) -> list[Incident]:
        """Close the incidents that have been quiet for ``recovery_steps`` by ``step``."""
        if self._due is None or step < self._due:
            return []
        gap = self.config.recovery_steps
        done = [i for i in self.open.values() if step - i.last > gap]
        for i in done:
            del self.open[i.problem]
        self._reschedule()
        return done

    def decide(self, step: int, triggers: Sequence[Trigger]) -> Decision:
        fresh: list[Trigger] = []
        held: list[Trigger] = []
        opened: dict[str, bool] = {}  # problem -> snapshot made, for incidents opened now
        for t in triggers:
            problem = problem_of(t.kind)
            incident = self.open.get(problem)
            if problem in _NO_INCIDENT:
                snap = self._cooled(step, problem)
            elif problem in opened:  # a second trigger of a problem that opened now
                assert incident is not None
                self._extend(incident, step, t)
                snap = opened[problem]
            elif incident is not None and step - incident.last <= self.config.recovery_steps:
                self._extend(incident, step, t)
                snap = False
            else:
                self.open[problem] = Incident(
                    f"{problem}@{step}",
                    problem,
                    step,
                    step,
                    step,
                    t.name,
                    _score(t),
                    severity=t.severity.value,
                )
                snap = opened[problem] = self._cooled(step, problem)
            (fresh if snap else held).append(t)
        for t in fresh:
            self.last_snapshot[problem_of(t.kind)] = step
        self._reschedule()
        if not fresh:
            return Decision((), tuple(held), "", severity_of(held))
        incidents = tuple(self.open[p] for p, snap in opened.items() if snap)
        name = fresh[0].name if len(fresh) == 1 else MULTIPLE
        return Decision(tuple(fresh), tuple(held), name, severity_of(fresh), incidents)

    def _cooled(self, step: int, problem: str) -> bool:
        """Whether ``problem`` may make a snapshot at ``step`` (outside its cooldown)."""
        last = self.last_snapshot.get(problem)
        return last is None or last == step or not 0 <= step - last < self.config.cooldown_steps

    @staticmethod
    def _extend(incident: Incident, step: int, t: Trigger) -> None:
        incident.detections += 1
        incident.last = step
        score = _score(t)
        if score > incident.peak_score:
            incident.peak_step, incident.peak_trigger, incident.peak_score = step, t.name, score
            incident.severity = t.severity.value

    def _reschedule(self) -> None:
        gap = self.config.recovery_steps
        self._due = min((i.last + gap + 1 for i in self.open.values()), default=None)

    def rewind(self, step: int) -> None:
        """The trainer went back to ``step``: later snapshots belong to another segment."""
        self.last_snapshot = {k: s for k, s in self.last_snapshot.items() if s <= step}
        self.open = {p: i for p, i in self.open.items() if i.started <= step}
        self._reschedule()

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_snapshot": dict(self.last_snapshot),
            "open": [asdict(i) for i in self.open.values()],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_snapshot = {str(k): int(v) for k, v in state.get("last_snapshot", {}).items()}
        self.open = {}
        for block in state.get("open", []):
            incident = Incident(**block)
            self.open[incident.problem] = incident
        self._reschedule()
