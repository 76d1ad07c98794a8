"""The pure core: records in, outcomes out. ``run`` and ``replay`` drive this very
object, so what ``replay`` shows on an old run is what ``run`` would have done live."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from smart_monitor import __version__
from smart_monitor.batch import TrainBlock
from smart_monitor.config import Config, PolicyConfig
from smart_monitor.detectors import build_detectors
from smart_monitor.notes import Note
from smart_monitor.policy import Decision, Policy
from smart_monitor.records import EvalRecord, ExampleRecord, Record, SummaryRecord, TrainRecord
from smart_monitor.triggers import Severity, Trigger

__all__ = ["Outcome", "Pipeline", "SnapshotRequest"]

STATE_VERSION = 1
_MIN_BLOCK = 32  # shorter runs of train records go through process() one by one
_RECENT_STEPS = 64  # train steps remembered to tell a second writer's records
_RUN_STARTS = 16  # first steps of segments remembered (a new writer starting at one)
_INTERLEAVE_GAPS = 2  # a second writer lags by at most this many logging intervals


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """A snapshot to make. ``key`` is its idempotency key (segment, step, name): a
    daemon restarted after a crash that re-reads the same lines asks for the same key.
    ``exact_checkpoint``: wait for ``checkpoint-<step>`` (a new best model)."""

    key: str
    name: str
    step: int
    severity: Severity
    triggers: tuple[Trigger, ...]
    exact_checkpoint: bool
    metadata: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Outcome:
    """Everything one record caused; ``None`` from ``process`` means nothing did.
    ``extra``: the incidents it ended, by their status (``recovered``, ``settled``)."""

    step: int
    triggers: tuple[Trigger, ...] = ()
    suppressed: tuple[Trigger, ...] = ()
    snapshot: SnapshotRequest | None = None
    restarted_after: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[Note, ...] = ()
    quiet: tuple[Trigger, ...] = ()  # of ``triggers``: counted, not logged one by one
    ended: Outcome | None = None  # the previous run's end, when this record starts a new one


class Pipeline:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.detectors = build_detectors(config.detectors)
        self.policy = Policy(config.policy)
        self.loss_history: deque[tuple[int, float]] = deque(maxlen=config.policy.history)
        self.lr_history: deque[tuple[int, float]] = deque(maxlen=config.policy.history)
        self.examples: deque[Mapping[str, Any]] = deque(maxlen=config.policy.recent_examples)
        self.last_step: int | None = None
        self.segment = 0
        self.first: tuple[int, float] | None = None  # the run's first train step and loss
        self.first_step: int | None = None  # the segment's first train step, whatever its loss
        self.first_checkpoint: int | None = None  # the segment's earliest checkpoint seen
        self.recent_steps: deque[int] = deque(maxlen=_RECENT_STEPS)
        self.gap = 0  # the last advance of the latest step: the logging interval
        self.duplicates = 0  # records dropped as a second writer's copies
        self.new_writer = False  # a new file or process began; no train record since
        # the first steps of this run's segments: a new writer that starts at one of
        # them starts from the beginning again (Detectron2 runs repeated into one folder)
        self.run_starts: deque[int] = deque(maxlen=_RUN_STARTS)
        self.latest: dict[str, float] = {}  # the newest value of each main series (/metrics)
        self._horizon = 256  # records screened at once by process_block (adapts)

    def process(self, record: Record) -> Outcome | None:
        if isinstance(record, SummaryRecord):
            return self._end(record)  # HF's end of training
        restarted_after = None
        previous_run = None
        notes: list[Note] = []
        step = record.step
        if isinstance(record, TrainRecord):
            train_step = record.step
            fresh = self.new_writer and self.first_step is not None and (
                self.first_checkpoint is None
            )
            if self.last_step is not None and (train_step < self.last_step or (fresh and (
                train_step == self.last_step or train_step in self.run_starts
            ))):
                if not fresh and self._duplicate(train_step):
                    return self._dropped(record)
                if fresh or self._new_run(record):
                    previous_run = self._end(None)  # the old run's conclusions, by its detectors
                    notes.append(self._restart(record))
                else:
                    restarted_after = self.last_step
                    self.rewind(train_step - 1)
            self._advance(record)
            if record.loss is not None:
                self.loss_history.append((train_step, record.loss))
            if record.learning_rate is not None:
                self.lr_history.append((train_step, record.learning_rate))
            self._latest(loss=record.loss, learning_rate=record.learning_rate,
                         grad_norm=record.grad_norm)
        elif isinstance(record, EvalRecord):
            self._latest(eval_loss=record.eval_loss)
        elif isinstance(record, ExampleRecord):
            self.examples.append(record.raw)
        if step is None:
            step = self.last_step if self.last_step is not None else 0
        elif self.last_step is None or step > self.last_step:
            self.last_step = step
        triggers: list[Trigger] = []
        for detector in self.detectors.values():
            fired = detector.update(record)
            if fired:
                triggers.extend(fired)
            said = detector.notes  # LR changed
            if said:
                notes.extend(said)
                said.clear()
        ended = self.policy.observe(step)
        decision = self.policy.decide(step, triggers) if triggers else None
        if isinstance(record, TrainRecord):
            self.policy.learn(record.step, record.loss, record.grad_norm)
        extra = {
            status: tuple(i for i in ended if i.status == status)
            for status in {i.status for i in ended}
        }
        if decision is None:
            if restarted_after is None and not ended and not notes:
                return None
            return Outcome(step, restarted_after=restarted_after, extra=extra, notes=tuple(notes),
                           ended=previous_run)
        request = self._request(step, decision, record) if decision.snapshot else None
        return Outcome(
            step, tuple(triggers), decision.suppressed, request, restarted_after, extra=extra,
            notes=(*notes, *decision.notes), quiet=decision.quiet, ended=previous_run,
        )

    def end_run(self) -> Outcome | None:
        """The run is over (the end of a replay): what the detectors conclude only
        when a run ends (overfitting whose patience had nothing left to wait for, a short
        run that never learned). Also drawn at HF's end-of-training record and when a
        new run starts in the same folder; each conclusion is drawn once."""
        return self._end(None)

    def _end(self, summary: SummaryRecord | None) -> Outcome | None:
        """The run's end, as the detectors see it: ``summary`` (its step, or the latest
        one), or a record that says no more than that."""
        raw = summary.raw if summary is not None else {}
        at = summary.step if summary is not None and summary.step is not None else self.last_step
        if at is None:
            return None
        record = SummaryRecord(at, raw)
        triggers = [t for d in self.detectors.values() for t in d.update(record)]
        if not triggers:
            return None
        decision = self.policy.decide(at, triggers)
        request = self._request(at, decision, record) if decision.snapshot else None
        return Outcome(at, tuple(triggers), decision.suppressed, request,
                       notes=decision.notes, quiet=decision.quiet)

    def _advance(self, record: TrainRecord) -> None:
        self.new_writer = False
        step = record.step
        if self.last_step is not None and step > self.last_step:
            self.gap = step - self.last_step
        self.last_step = step
        self.recent_steps.append(step)
        if self.first is None and record.loss is not None and math.isfinite(record.loss):
            self.first = (step, record.loss)
        if self.first_step is None:
            self.first_step = step
            if step not in self.run_starts:
                self.run_starts.append(step)

    def _latest(self, **values: float | None) -> None:
        self.latest.update((k, v) for k, v in values.items() if v is not None)

    def _duplicate(self, step: int) -> bool:
        """A step seen a moment ago, a logging interval or two back: a second process
        appending the same records (one rank too many), not a resume."""
        assert self.last_step is not None
        lag = self.last_step - step
        return 0 < lag <= _INTERLEAVE_GAPS * self.gap and step in self.recent_steps

    def _dropped(self, record: TrainRecord) -> Outcome | None:
        self.duplicates += 1
        if self.duplicates > 1:
            return None
        assert self.last_step is not None
        fields = {"step": record.step, "latest_step": self.last_step, "action": "dedup_by_step"}
        return Outcome(record.step, notes=(Note("Interleaved writers", "warning", fields),))

    def writer_started(self) -> None:
        """The next records come from a new writer: a file the source had not read, or
        a process that began writing on into the same file. If its steps go back (or
        repeat the last step), it is a new run unless a checkpoint it could have
        resumed from was seen: the only sign of a resume, and a replay without
        checkpoints has none. So the runs of a shared logging folder, or of a
        ``results.csv`` appended after a restart, are told apart."""
        self.new_writer = True

    def checkpoint_seen(self, step: int) -> None:
        """The trainer saved ``checkpoint-<step>`` (the engine says so when it completes)."""
        if self.first_checkpoint is None or step < self.first_checkpoint:
            self.first_checkpoint = step

    def _new_run(self, record: TrainRecord) -> bool:
        """Steps back to the segment's first logged step, or to before its first
        checkpoint: a new run from scratch into the same folder, whatever its loss
        (FAULTS.md #50, #52: another seed or model starts elsewhere). A resume cannot go
        there: it starts right after the checkpoint it loads, and none came before."""
        start = max(self.first_step or 0, self.first_checkpoint or 0)
        return self.first_step is not None and record.step <= start

    def _restart(self, record: TrainRecord) -> Note:
        """A new segment with fresh detectors and policy: nothing of the old run is a
        baseline for the new one."""
        previous = self.last_step
        self.segment += 1
        self.detectors = build_detectors(self.config.detectors)
        self.policy = Policy(self.config.policy)
        for history in (self.loss_history, self.lr_history):
            history.clear()
        self.last_step = self.first = self.first_step = self.first_checkpoint = None
        self.recent_steps.clear()
        self.gap = 0
        return Note("Run restarted", "warning", {
            "step": record.step, "previous_step": previous, "loss": record.loss,
            "segment": self.segment,
        })

    def process_block(
        self,
        block: TrainBlock,
        act: Callable[[Outcome], None],
        between: Sequence[tuple[int, Callable[[], None]]] = (),
    ) -> None:
        """The same as ``process`` on each record of ``block``, in order, with ``act``
        called on each outcome; ``between``: ``(k, handle)`` pairs, sorted, to run just
        before record ``k`` (the other records of the stream: evals, examples, bad lines).

        In bulk: the detectors screen a stretch of the block, the records before the
        first candidate are absorbed (each detector's state ends where ``process`` would
        leave it, down to the z-scores of the last record), the candidate itself goes
        through ``process``.
        A screen stays valid across ``between``: the screening detectors learn from train
        records only; what another record can change (an incident's due step, the latest
        step) is checked after each."""
        n = len(block)
        pending = deque(between)
        if n < _MIN_BLOCK:  # numpy's fixed costs outweigh the gain on a few records
            for j in range(n):
                while pending and pending[0][0] <= j:
                    pending.popleft()[1]()
                self._process_into(block, j, act)
            for _, handle in pending:
                handle()
            return
        i = quiet_to = screened_to = 0  # records [i, quiet_to) are known to be quiet
        horizon = self._horizon
        while i < n or pending:
            if pending and pending[0][0] <= i:
                due, last = self.policy.due, self.last_step
                pending.popleft()[1]()
                if self.policy.due != due or self.last_step != last:
                    quiet_to = i  # screen again
                continue
            if i >= quiet_to:
                stop = min(n, i + horizon)
                quiet_to, screened_to = self._screen(block, i, stop), stop
                grew = quiet_to == stop
                horizon = min(4 * horizon, 1 << 16) if grew else max(16, 2 * (quiet_to - i))
            k = min(quiet_to, pending[0][0] if pending else n)
            if k > i:
                self._absorb(block, i, k)
                i = k
            if i == quiet_to < screened_to and not (pending and pending[0][0] <= i):
                self._process_into(block, i, act)  # the candidate
                i += 1
                quiet_to = i
        self._horizon = horizon

    def _process_into(self, block: TrainBlock, j: int, act: Callable[[Outcome], None]) -> None:
        out = self.process(block.record(j))
        if out is not None:
            act(out)

    def _screen(self, block: TrainBlock, start: int, stop: int) -> int:
        if self.last_step is not None and (block.rows[start][0] < self.last_step
                                           or self.new_writer):
            return start  # steps went backwards, or a new writer: for process()
        if self.first is None:
            return start  # the run's first loss, for telling a new run later
        end = start + self.policy.first_due(block.steps[start:stop])
        for detector in self.detectors.values():
            if end == start:
                break
            end = min(end, detector.screen(block, start, end))
        return end

    def _absorb(self, block: TrainBlock, start: int, end: int) -> None:
        for detector in self.detectors.values():
            detector.absorb(block, start, end)
        self.policy.absorb(block, start, end)
        rows = block.rows
        before = rows[end - 2][0] if end - start >= 2 else self.last_step
        if before is not None:
            self.gap = rows[end - 1][0] - before
        self.last_step = rows[end - 1][0]
        self.new_writer = False
        self.recent_steps.extend(block.steps[max(start, end - _RECENT_STEPS) : end].tolist())
        first = max(start, end - self.config.policy.history)
        steps = block.steps[first:end].tolist()
        for history, column in ((self.loss_history, block.loss),
                                (self.lr_history, block.learning_rate)):
            if column is not None:
                history.extend(zip(steps, column[first:end].tolist(), strict=True))  # in C
        last = rows[end - 1]  # a block's records all have the same keys (TrainBlock)
        self._latest(loss=last[1], learning_rate=last[2], grad_norm=last[3])

    def external(
        self, step: int, triggers: tuple[Trigger, ...], metrics: Mapping[str, Any]
    ) -> Outcome:
        """Triggers found outside the record stream (the checkpoint scan) take the same
        policy path: cooldown, MULTIPLE_TRIGGERS, the same metadata; ``metrics`` stands
        in for the triggering record. The snapshot keeps ``checkpoint-<step>`` itself:
        its own weights are the finding (not the state before it, as for a loss)."""
        decision = self.policy.decide(step, triggers)
        record = SummaryRecord(step, metrics)
        request = self._request(step, decision, record) if decision.snapshot else None
        if request is not None:
            request = replace(request, exact_checkpoint=True)
        return Outcome(step, triggers, decision.suppressed, request)

    def _request(self, step: int, decision: Decision, record: Record) -> SnapshotRequest:
        kinds = {t.kind for t in decision.snapshot}
        if kinds == {"best_model_loss"}:  # a burst's last best fires one evaluation late
            step = decision.snapshot[0].step
        return SnapshotRequest(
            key=f"{self.segment}:{step}:{decision.name}",
            name=decision.name,
            step=step,
            severity=decision.severity,
            triggers=decision.snapshot,
            exact_checkpoint=kinds == {"best_model_loss"},
            metadata=self._metadata(step, decision, record),
        )

    def _metadata(self, step: int, decision: Decision, record: Record) -> dict[str, Any]:
        """Every ``metadata.json`` key of DESIGN.md but ``created_at`` and ``checkpoint``,
        which the snapshot writer adds."""
        return {
            "triggers": [t.name for t in decision.snapshot],
            "severity": decision.severity.value,
            "step": step,
            "z_scores": {"loss": self._last_z("loss_zscore"), "lr": self._last_z("lr_zscore")},
            "recent_examples": list(self.examples),
            "loss_history": [list(p) for p in self.loss_history],
            "lr_history": [list(p) for p in self.lr_history],
            "metrics": dict(record.raw),
            "details": {t.name: dict(t.details) for t in decision.snapshot},
            **_incident_blocks(decision, self.config.policy),
            "segment": self.segment,
            "monitor": {"version": __version__, "config": self.config.model_dump(mode="json")},
        }

    def _last_z(self, name: str) -> float | None:
        detector = self.detectors.get(name)
        z = detector.last_z if detector is not None else None
        return None if z is None else round(float(z), 4)

    def rewind(self, step: int) -> None:
        """The trainer resumed from the checkpoint at ``step``: drop what came after."""
        self.segment += 1
        for detector in self.detectors.values():
            detector.rewind(step)
        self.policy.rewind(step)
        for history in (self.loss_history, self.lr_history):
            kept = [p for p in history if p[0] <= step]
            history.clear()
            history.extend(kept)
        steps = [s for s in self.recent_steps if s <= step]
        self.recent_steps.clear()
        self.recent_steps.extend(steps)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "detectors": {name: d.state_dict() for name, d in self.detectors.items()},
            "policy": self.policy.state_dict(),
            "loss_history": [list(p) for p in self.loss_history],
            "lr_history": [list(p) for p in self.lr_history],
            "examples": list(self.examples),
            "last_step": self.last_step,
            "segment": self.segment,
            "first": list(self.first) if self.first else None,
            "first_step": self.first_step,
            "first_checkpoint": self.first_checkpoint,
            "recent_steps": list(self.recent_steps),
            "gap": self.gap,
            "duplicates": self.duplicates,
            "new_writer": self.new_writer,
            "run_starts": list(self.run_starts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Reads states written by older versions: a field they lack keeps its default."""
        for name, detector in self.detectors.items():
            detector.load_state_dict(state.get("detectors", {}).get(name, {}))
        self.policy.load_state_dict(state.get("policy", {}))
        self.loss_history.extend((int(s), float(v)) for s, v in state.get("loss_history", []))
        self.lr_history.extend((int(s), float(v)) for s, v in state.get("lr_history", []))
        self.examples.extend(state.get("examples", []))
        self.last_step = state.get("last_step")
        self.segment = int(state.get("segment", 0))
        first = state.get("first")
        self.first = (int(first[0]), float(first[1])) if first else None
        self.first_step = state.get("first_step", self.first[0] if self.first else None)
        self.first_checkpoint = state.get("first_checkpoint")
        self.recent_steps.extend(int(s) for s in state.get("recent_steps", []))
        self.gap = int(state.get("gap", 0))
        self.duplicates = int(state.get("duplicates", 0))
        self.new_writer = bool(state.get("new_writer", False))
        self.run_starts.extend(int(s) for s in state.get("run_starts", []))


def _incident_blocks(decision: Decision, policy: PolicyConfig) -> dict[str, Any]:
    """``incident``: the incident this snapshot opens, ``"status": "open"``; the engine
    completes it (peak, last detection, ``recovered_step``) when the incident recovers,
    as the log's ``Incident recovered`` line with the same id says. ``conflicting_labels``:
    the prompt and both golden answers; ``overfitting``: the best step and value (the
    engine adds the best model's snapshot); ``not_learning``: the figures."""
    out: dict[str, Any] = {}
    if decision.incidents:
        first = decision.incidents[0]
        out["incident"] = {
            "id": first.id,
            "problem": first.problem,
            "started": first.started,
            "status": "open",
            "recovers_after_steps": policy.recovery_steps,
            "recovers_after_records": policy.recovery_records,
            "also": [i.id for i in decision.incidents[1:]],
        }
    for t in decision.snapshot:
        if t.kind in _EVIDENCE:  # a conclusion's evidence, under its kind's name
            out[t.kind] = dict(t.details)
    return out


# Kinds whose snapshot metadata carries the trigger's details as their own block
# (DESIGN.md: the prompt and both answers; the best model; the figures).
_EVIDENCE = ("conflicting_labels", "overfitting", "not_learning")
