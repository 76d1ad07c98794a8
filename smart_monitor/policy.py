"""Triggers in, decisions out: severity, MULTIPLE_TRIGGERS, incidents and cooldowns.

One problem, one snapshot: consecutive detections of one problem (``problem_of``: a
loss z-score and a loss spike are one problem) form an *incident*. Its first detection
makes the snapshot (the checkpoint before it went wrong is the one worth keeping); the
ones after it are counted, and the incident keeps its peak. Only the first detection of
each trigger kind in an incident is logged; the rest are summed up by ``Incident
ongoing`` notes at growing counts (10, 100, 1,000, ...), so a run that stays broken for
16,000 records writes tens of lines. It ends when ``recovery_steps`` pass *and*
``recovery_records`` records arrive without a detection of its problem: a run logged
every 200 steps that stays broken stays one incident.

Detections stopping is not the run coming back: a z-score window relearns a worse loss
in twenty records. So an incident on the loss *recovers* only when the median of the
last ``recovery_records`` losses is back within the level and noise of the
``recovery_records`` losses before it started (kept with the incident); otherwise it
*settles*: the loss stays at a worse level the detectors now take for normal, a warning
that names both levels, and no recovery for whatever resolves on one. An incident on
non-finite values does not end while the latest loss or grad norm is non-finite.

A critical detection in a warning loss-spike incident (a spike that did not come back)
escalates it: a snapshot, whatever the cooldown, since that is when an action is due.
Transient loss spikes that keep coming back (a spiky pretraining run) form a recurring
episode: ``recurring_snapshots`` snapshots for all of it, each spike still counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from smart_monitor.batch import TrainBlock
from smart_monitor.config import PolicyConfig
from smart_monitor.notes import Note
from smart_monitor.stats import MAD_SIGMA, RollingMedian
from smart_monitor.triggers import Severity, Trigger, problem_of

__all__ = ["MULTIPLE", "Decision", "Incident", "Policy", "severity_of"]

MULTIPLE = "MULTIPLE_TRIGGERS"
_NO_INCIDENT = frozenset({"best_model_loss"})  # every new best is its own event
_TRANSIENT = frozenset({"loss_spike"})  # problems whose incidents can recur as episodes
_RECURRING_TEXT = {"loss_spike": "Recurring loss spikes"}
_ON_LOSS = frozenset({"loss_spike", "divergence_detected"})  # judged by the loss level
_NONFINITE = "nonfinite"
# Conclusions about the run (overfitting, not learning) are not episodes that quiet
# records end: the eval loss that stays worse would read as a recovery. A new best
# ends an overfitting episode in its detector; the incident stays open for alerts.
_CONCLUSIONS = frozenset({"overfitting", "not_learning"})
# Back means within this many standard deviations (scaled MAD) of the level before, or
# this share of it when those losses were flat (two-decimal logs round the noise away).
_NOISE_SIGMAS = 2.0
_FLAT_SHARE = 0.01


@dataclass(slots=True)
class Incident:
    """Consecutive detections of one problem. ``peak_*``: the strongest detection
    (highest severity, then largest abs z / pct / ratio). ``last_record``: the record
    count at the last detection; ``kinds``: the trigger kinds logged so far;
    ``next_note``: the detection count of the next ``Incident ongoing`` note.
    ``level_before`` / ``noise_before``: median and standard deviation (scaled MAD) of
    the losses before it started (None: not a loss incident, or no loss yet);
    ``level_now``: the median at its end; ``status``: open, recovered or settled."""

    id: str
    problem: str
    started: int
    last: int
    peak_step: int
    peak_trigger: str
    peak_score: float
    detections: int = 1
    severity: str = Severity.WARNING.value
    last_record: int = 0
    kinds: list[str] = field(default_factory=list)
    next_note: int = 10
    level_before: float | None = None
    noise_before: float = 0.0
    level_now: float | None = None
    status: str = "open"

    @property
    def ratio(self) -> float | None:
        """The loss level at the end over the level before (None: no level, or a
        level before that is not positive)."""
        if self.level_before is None or self.level_now is None or self.level_before <= 0:
            return None
        return round(self.level_now / self.level_before, 4)

    def levels(self) -> dict[str, Any]:
        """``level_before``, ``level_now`` and ``ratio`` for a loss incident that ended
        (empty otherwise): the log line and the metadata block name them alike."""
        if self.level_before is None or self.level_now is None:
            return {}
        return {"level_before": round(self.level_before, 6),
                "level_now": round(self.level_now, 6), "ratio": self.ratio}

    def block(self) -> dict[str, Any]:
        """The ``incident`` block of ``metadata.json``; ``transient``: it came back
        without ever turning critical."""
        out = {k: v for k, v in asdict(self).items() if k in _BLOCK_KEYS}
        out["transient"] = self.status == "recovered" and self.severity != Severity.CRITICAL.value
        return {**out, **self.levels()}

    def note(self, step: int) -> Note:
        return Note(
            "Incident ongoing",
            Severity(self.severity).value,
            {
                "step": step, "incident": self.id, "problem": self.problem,
                "detections": self.detections, "peak_step": self.peak_step,
                "peak_trigger": self.peak_trigger, "severity": self.severity,
            },
        )


_BLOCK_KEYS = ("id", "problem", "started", "last", "peak_step", "peak_trigger", "detections",
               "severity", "status")


@dataclass(slots=True)
class _Episode:
    """Incidents of one transient problem, each within ``recurring_steps`` of the last."""

    since: int
    last: int
    count: int = 1
    snapshots: int = 0
    next_note: int = 0


def _score(t: Trigger) -> float:
    d = t.details
    value = d.get("z", d.get("pct", d.get("ratio", 0.0)))
    magnitude = abs(float(value)) if isinstance(value, int | float) else 0.0
    return t.severity.rank * 1e12 + min(magnitude, 1e11)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with the triggers of one record: ``snapshot`` holds the triggers a
    snapshot is made for (empty: none), ``suppressed`` those that belong to an open
    incident or fall in their problem's cooldown and are logged; ``quiet`` the ones
    only counted (a kind already logged in its incident); ``incidents`` the incidents
    the snapshot opens; ``notes`` the log events the decision adds."""

    snapshot: tuple[Trigger, ...]
    suppressed: tuple[Trigger, ...]
    name: str
    severity: Severity
    incidents: tuple[Incident, ...] = ()
    quiet: tuple[Trigger, ...] = ()
    notes: tuple[Note, ...] = ()


def severity_of(triggers: Sequence[Trigger]) -> Severity:
    """The highest severity; MULTIPLE_TRIGGERS with three or more is critical."""
    if len(triggers) >= 3:
        return Severity.CRITICAL
    return max((t.severity for t in triggers), key=lambda s: s.rank)


class Policy:
    """Incidents, then a cooldown: a problem that made a snapshot at step S makes no
    other before S + ``cooldown_steps``, even in a new incident.

    >>> from .triggers import Trigger
    >>> p = Policy(PolicyConfig(cooldown_steps=100, recovery_steps=50, recovery_records=2))
    >>> t = lambda s: Trigger("loss_spike", "loss_spike_190.0pct", Severity.WARNING, s)
    >>> p.decide(500, [t(500)]).name, len(p.decide(520, [t(520)]).quiet)
    ('loss_spike_190.0pct', 1)
    >>> p.observe(560), [(i.started, i.last, i.detections) for i in p.observe(571)]
    ([], [(500, 520, 2)])
    """

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self.last_snapshot: dict[str, int] = {}
        self.open: dict[str, Incident] = {}
        self.episodes: dict[str, _Episode] = {}
        self.records = 0  # records observed, for recovery measured in records
        self.level = RollingMedian(config.recovery_records)  # the latest finite losses
        self.nonfinite: set[str] = set()  # series whose latest value is NaN or infinite

    @property
    def due(self) -> tuple[int, int] | None:
        """Changes whenever ``observe`` may close an incident sooner than a screen
        computed (None: no incident open)."""
        if not self.open:
            return None
        return min(i.last for i in self.open.values()), self.records

    def first_due(self, steps: npt.NDArray[np.int64]) -> int:
        """The index in ``steps`` (the next records) of the first at which ``observe``
        may close an incident: both its step and its record count are far enough. A
        conclusion (overfitting, not learning) stays open for good: it is never due."""
        found = len(steps)
        for i in self.open.values():
            if i.problem in _CONCLUSIONS:
                continue
            by_step = int(steps.searchsorted(i.last + self.config.recovery_steps + 1))
            by_record = i.last_record + self.config.recovery_records - self.records - 1
            found = min(found, max(by_step, by_record, 0))
        return found

    def absorb(self, block: TrainBlock, start: int, end: int) -> None:
        """Records ``[start, end)`` of ``block`` went by quiet without ``observe`` (the
        bulk path): counted, their losses learnt; a block holds finite values only."""
        self.records += end - start
        if block.loss is not None:
            self.level.extend(*block.tail(block.loss, start, end, self.level.size))
            self.nonfinite.discard("loss")
        if block.rows[start][3] is not None:
            self.nonfinite.discard("grad_norm")

    def learn(self, step: int, loss: float | None, grad_norm: float | None) -> None:
        """After ``decide``: a train record's values, so that an incident opened by
        this record keeps the level before it."""
        for name, value in (("loss", loss), ("grad_norm", grad_norm)):
            if value is None:
                continue
            if math.isfinite(value):
                self.nonfinite.discard(name)
                if name == "loss":
                    self.level.add(step, value)
            else:
                self.nonfinite.add(name)

    def observe(self, step: int) -> list[Incident]:
        """Count one record; end the incidents quiet for long enough by ``step``, each
        ``recovered`` or ``settled`` (``status``)."""
        self.records += 1
        if not self.open:
            return []
        done = [
            i for i in self.open.values()
            if step - i.last > self.config.recovery_steps
            and self.records - i.last_record >= self.config.recovery_records
            and not (i.problem == _NONFINITE and self.nonfinite)
            and i.problem not in _CONCLUSIONS
        ]
        for i in done:
            del self.open[i.problem]
            i.status = "recovered"
            if i.level_before is not None and len(self.level):
                i.level_now = self.level.median
                band = max(_NOISE_SIGMAS * i.noise_before, _FLAT_SHARE * abs(i.level_before))
                if i.level_now > i.level_before + band:
                    i.status = "settled"
        return done

    def decide(self, step: int, triggers: Sequence[Trigger]) -> Decision:
        fresh: list[Trigger] = []
        held: list[Trigger] = []
        quiet: list[Trigger] = []
        notes: list[Note] = []
        opened: dict[str, bool] = {}  # problem -> snapshot made, for incidents opened now
        escalated: list[Incident] = []
        for t in triggers:
            problem = problem_of(t.kind)
            if t.severity is Severity.INFO and problem in _TRANSIENT:
                continue  # the run's texture (detectors/texture.py): logged, no incident
            incident = self.open.get(problem)
            logged = True
            if problem in _NO_INCIDENT:
                snap = self._cooled(step, problem)
            elif problem in opened:  # a second trigger of a problem that opened now
                assert incident is not None
                self._extend(incident, step, t)
                snap = opened[problem]
            elif incident is not None:
                escalates = t.severity.rank > Severity(incident.severity).rank
                stronger = _score(t) > incident.peak_score  # a new peak is news
                logged = escalates or stronger or t.kind not in incident.kinds
                self._extend(incident, step, t)
                snap = escalates and t.severity is Severity.CRITICAL and problem in _TRANSIENT
                if snap:
                    escalated.append(incident)
                if incident.detections >= incident.next_note:
                    incident.next_note *= 10
                    notes.append(incident.note(step))
            else:
                incident = self.open[problem] = Incident(
                    f"{problem}@{step}", problem, step, step, step, t.name, _score(t),
                    severity=t.severity.value, last_record=self.records, kinds=[t.kind],
                )
                if problem in _ON_LOSS and len(self.level):
                    incident.level_before = self.level.median
                    incident.noise_before = MAD_SIGMA * self.level.mad
                may = self._episode(step, t, notes)  # counted even in a cooldown
                snap = opened[problem] = may and self._cooled(step, problem)
            if snap:
                fresh.append(t)
            elif logged:
                held.append(t)
            else:
                quiet.append(t)
        for t in fresh:
            self.last_snapshot[problem_of(t.kind)] = step
        for problem, snap in opened.items():
            episode = self.episodes.get(problem)
            if snap and episode is not None and episode.last == step:
                episode.snapshots += 1
        if not fresh:
            severity = severity_of(held or quiet or triggers)
            return Decision((), tuple(held), "", severity, (), tuple(quiet), tuple(notes))
        incidents = tuple(self.open[p] for p, snap in opened.items() if snap) + tuple(escalated)
        name = fresh[0].name if len(fresh) == 1 else MULTIPLE
        return Decision(
            tuple(fresh), tuple(held), name, severity_of(fresh), incidents, tuple(quiet),
            tuple(notes),
        )

    def _episode(self, step: int, t: Trigger, notes: list[Note]) -> bool:
        """Count a new incident of a transient problem in its episode; whether the
        episode may still make a snapshot for it."""
        problem = problem_of(t.kind)
        if problem not in _TRANSIENT or t.severity is Severity.CRITICAL:
            return True
        episode = self.episodes.get(problem)
        if episode is None or step - episode.last > self.config.recurring_steps:
            episode = self.episodes[problem] = _Episode(step, step)
        else:
            episode.count += 1
            episode.last = step
        if episode.count >= self.config.recurring_after and episode.count >= episode.next_note:
            episode.next_note = max(10, episode.next_note * 10)
            notes.append(Note(_RECURRING_TEXT[problem], "warning", {
                "step": step, "count": episode.count, "in_steps": step - episode.since,
                "since": episode.since, "snapshots": episode.snapshots,
            }))
        return episode.snapshots < self.config.recurring_snapshots

    def _cooled(self, step: int, problem: str) -> bool:
        """Whether ``problem`` may make a snapshot at ``step`` (outside its cooldown)."""
        last = self.last_snapshot.get(problem)
        return last is None or last == step or not 0 <= step - last < self.config.cooldown_steps

    def _extend(self, incident: Incident, step: int, t: Trigger) -> None:
        incident.detections += 1
        incident.last = step
        incident.last_record = self.records
        if t.kind not in incident.kinds:
            incident.kinds.append(t.kind)
        score = _score(t)
        if score > incident.peak_score:
            incident.peak_step, incident.peak_trigger, incident.peak_score = step, t.name, score
            incident.severity = t.severity.value

    def rewind(self, step: int) -> None:
        """The trainer went back to ``step``: later snapshots belong to another segment."""
        self.last_snapshot = {k: s for k, s in self.last_snapshot.items() if s <= step}
        self.open = {p: i for p, i in self.open.items() if i.started <= step}
        self.level.rewind(step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_snapshot": dict(self.last_snapshot),
            "open": [asdict(i) for i in self.open.values()],
            "episodes": {p: asdict(e) for p, e in self.episodes.items()},
            "records": self.records,
            "level": self.level.state_dict(),
            "nonfinite": sorted(self.nonfinite),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_snapshot = {str(k): int(v) for k, v in state.get("last_snapshot", {}).items()}
        self.open = {}
        for block in state.get("open", []):
            incident = Incident(**block)
            self.open[incident.problem] = incident
        self.episodes = {str(p): _Episode(**e) for p, e in state.get("episodes", {}).items()}
        self.records = int(state.get("records", 0))
        self.level.load_state_dict(state.get("level", {}))
        self.nonfinite = {str(n) for n in state.get("nonfinite", [])}
