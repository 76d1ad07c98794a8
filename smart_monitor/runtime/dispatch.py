"""Outcomes to log lines, events and snapshots: the pipeline decides, this acts.

A snapshot is made once per key (a restart that re-reads lines asks for the same key),
waits a while for a new best model's own checkpoint, and survives the trainer rotating
its checkpoints away while we read a backlog: after a few vanished candidates it keeps
its metadata alone rather than nothing at all."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smart_monitor.outputs.copier import Copier, CopyDone, CopyJob
from smart_monitor.outputs.incident import record_recovery
from smart_monitor.outputs.retention import enforce_keep_best
from smart_monitor.outputs.snapshot import SnapshotError, SnapshotResult, SnapshotWriter
from smart_monitor.pipeline import Outcome, Pipeline, SnapshotRequest
from smart_monitor.runtime.events import (
    Detected,
    Event,
    Listener,
    Restarted,
    SnapshotFailed,
    SnapshotMade,
)  # fmt: skip
from smart_monitor.sources.checkpoints import Checkpoint, CheckpointIndex
from smart_monitor.triggers import Trigger

__all__ = ["Dispatch"]

_VANISHED_RETRIES = 3
_BEST_REMEMBERED = 64  # best-model snapshots an overfitting conclusion may name
_COPY_STOP_SECONDS = 1.0  # at stop, a copy that ends within this is kept; later ones abandoned


@dataclass(slots=True)
class _Waiting:
    request: SnapshotRequest
    deadline: float


class Dispatch:
    def __init__(
        self,
        log: Any,
        pipeline: Pipeline,
        index: CheckpointIndex,
        writer: SnapshotWriter,
        checkpoint_wait: float,
        counts: Counter[str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.pipeline = pipeline
        self.index = index
        self.writer = writer
        self.checkpoint_wait = checkpoint_wait
        self.counts = counts
        self.clock = clock
        self.listeners: list[Listener] = []
        self.done_keys: set[str] = set()
        self._waiting: list[_Waiting] = []
        self._incident_snapshots: dict[str, Path] = {}  # open incident id -> its snapshot
        self._best_snapshots: dict[int, Path] = {}  # step -> its best-model snapshot
        self.copier: Copier | None = None  # set by the daemon: copies then run off the worker

    # -- what the daemon asks -------------------------------------------------------
    @property
    def waiting(self) -> bool:
        """A snapshot still to be made: a best model waiting for its checkpoint, or a
        copy in flight (the daemon holds its state save back meanwhile: a kill must not
        put the saved offset past its record)."""
        return bool(self._waiting) or (self.copier is not None and self.copier.busy)

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self._waiting), default=None)

    def remember(self, keys: Iterable[str]) -> None:
        """Keys of snapshots made before (found on disk, or removed by retention)."""
        self.done_keys.update(keys)

    # -- outcomes -------------------------------------------------------------------
    def act(self, outcome: Outcome) -> None:
        if outcome.restarted_after is not None:
            self.log.warning(
                "Trainer restarted", step=outcome.step, previous_step=outcome.restarted_after,
                segment=self.pipeline.segment,
            )
            self.emit(Restarted(outcome.step))
        for note in outcome.notes:
            getattr(self.log, note.level)(note.event, **note.fields)
        quiet = {id(q) for q in outcome.quiet}  # counted, summed up by the notes
        for t in outcome.triggers:
            self._detected(t, logged=id(t) not in quiet)
        if outcome.suppressed:
            self.log.info(
                "Suppressed snapshot",
                step=outcome.step,
                triggers=[t.name for t in outcome.suppressed],
                severity=max((t.severity for t in outcome.suppressed), key=lambda s: s.rank).value,
                reason="incident_or_cooldown",
            )
        if outcome.snapshot is not None:
            self._request(outcome.snapshot)
        for incident in outcome.extra.get("recovered", ()):
            self.log.info(
                "Incident recovered",
                step=outcome.step, incident=incident.id, problem=incident.problem,
                started=incident.started, peak_step=incident.peak_step,
                peak_trigger=incident.peak_trigger, last_detection=incident.last,
                detections=incident.detections, severity=incident.severity,
            )
            path = self._incident_snapshots.pop(incident.id, None)
            if path is not None:
                try:
                    record_recovery(path, incident.block(), outcome.step)
                except (OSError, ValueError) as exc:  # deleted by retention, or by hand
                    self.log.warning("Incident not recorded", incident=incident.id, error=str(exc))

    def _detected(self, t: Trigger, logged: bool = True) -> None:
        self.counts["detections"] += 1
        if logged:
            value = t.details.get("z", t.details.get("value"))
            getattr(self.log, t.severity.value)(
                "Detected anomaly",
                step=t.step, trigger=t.name, severity=t.severity.value, value=value,
            )
        self.emit(Detected(t.kind, t.severity.value, t.step))

    def emit(self, event: Event) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception as exc:  # a listener (metrics, actions) must never stop us
                self.log.error("Listener failed", event_name=event.name, error=repr(exc))

    # -- snapshots ------------------------------------------------------------------
    def _request(self, request: SnapshotRequest) -> None:
        if request.key in self.done_keys or (self.copier and self.copier.holds(request.key)):
            self.log.debug("Snapshot already exists", step=request.step, key=request.key)
            return
        wait = self.checkpoint_wait if request.exact_checkpoint else 0.0
        if wait > 0 and self.index.get(request.step) is None:
            self._waiting.append(_Waiting(request, self.clock() + wait))
            return
        self._snapshot(request)

    def poll(self) -> None:
        """Publish the copies that finished; make the waiting snapshots whose checkpoint
        arrived or whose wait ran out."""
        if self.copier is not None:
            for done in self.copier.collect():
                self._copied(done)
        if not self._waiting:
            return
        now = self.clock()
        still = []
        newest = max(self.index.complete, default=-1)
        for w in self._waiting:
            # a checkpoint past the step means checkpoint-<step> will never come (the
            # trainer saves in order): fall back now, before rotation deletes the others
            step = w.request.step
            if self.index.get(step) is not None or now >= w.deadline or newest > step:
                self._snapshot(w.request)
            else:
                still.append(w)
        self._waiting = still

    def flush(self) -> None:
        """On stop or at the end of a replay: make what waits with what exists."""
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            self._snapshot(w.request)
        if self.copier is not None:  # a stop waits a little for copies, then abandons them
            copier, self.copier = self.copier, None
            for done in copier.close(_COPY_STOP_SECONDS):
                self._copied(done)

    def _snapshot(self, request: SnapshotRequest, vanished: tuple[str, ...] = ()) -> None:
        """Make the snapshot: on this thread when it links (milliseconds), on the copier
        when it copies. ``vanished``: the candidate checkpoints already rotated away."""
        metadata = dict(request.metadata)
        metadata["key"] = request.key
        if "overfitting" in metadata:  # the best model the conclusion names
            metadata["overfitting"] = self._best_model(metadata["overfitting"])
        while True:
            ck = None if len(vanished) >= _VANISHED_RETRIES else self._checkpoint_for(request)
            if ck is None and vanished:
                metadata["note"] = "every candidate checkpoint vanished before it was pinned: " + (
                    ", ".join(vanished)
                )
            if ck is not None and self.copier is not None and self.writer.copies(ck):
                job = CopyJob(request.key, request.name, metadata, ck, (request, vanished))
                self.copier.submit(job)  # published when done; poll() collects it
                return
            try:
                result = self.writer.write(request.name, metadata, ck)
            except SnapshotError as exc:
                if exc.reason == "source_vanished" and ck is not None:
                    vanished = self._vanished(request, ck, exc, vanished)
                    continue
                self._failed(request, exc.reason, exc.detail)
                return
            except OSError as exc:
                self._failed(request, "io_error", str(exc))
                return
            self._created(request, metadata, ck, result)
            return

    def _best_model(self, evidence: Mapping[str, Any]) -> dict[str, Any]:
        """An overfitting conclusion's evidence with the snapshot of its best model: the
        newest best-model snapshot at or before the best step (an improvement smaller
        than ``best_model``'s margin makes no snapshot of its own)."""
        best_step = int(evidence.get("best_step", -1))
        steps = [s for s in self._best_snapshots if s <= best_step]
        path = self._best_snapshots[max(steps)] if steps else None
        return {**evidence, "best_snapshot": str(path) if path else None,
                "best_snapshot_step": max(steps) if steps else None}

    def _copied(self, done: CopyDone) -> None:
        """A copy made off the worker ended: published, vanished (try the next
        candidate), abandoned at stop (keep the metadata alone) or failed."""
        request, vanished = done.job.context
        ck, exc = done.job.checkpoint, done.error
        if exc is None:
            assert done.result is not None
            self._created(request, done.job.metadata, ck, done.result)
        elif exc.reason == "source_vanished":
            self._snapshot(request, self._vanished(request, ck, exc, vanished))
        elif exc.reason == "cancelled":
            self.log.warning("Copy abandoned", step=request.step, checkpoint=ck.name,
                             detail=exc.detail)
            metadata = {**done.job.metadata,
                        "note": f"stopped while copying {ck.name}: its copy was abandoned"}
            try:
                self._created(request, metadata, None,
                              self.writer.write(request.name, metadata, None))
            except (SnapshotError, OSError) as err:
                self._failed(request, "io_error", str(err))
        else:
            self._failed(request, exc.reason, exc.detail)

    def _vanished(
        self, request: SnapshotRequest, ck: Checkpoint, exc: SnapshotError,
        vanished: tuple[str, ...],
    ) -> tuple[str, ...]:
        self.log.warning("Checkpoint vanished", step=request.step, checkpoint=ck.name,
                         detail=exc.detail)
        self.index.forget(ck.step)
        return (*vanished, ck.name)

    def _created(
        self, request: SnapshotRequest, metadata: Mapping[str, Any], ck: Checkpoint | None,
        result: SnapshotResult,
    ) -> None:
        self.done_keys.add(request.key)
        self.counts["snapshots"] += 1
        if "incident" in metadata:
            self._incident_snapshots[metadata["incident"]["id"]] = result.path
        if all(t.kind == "best_model_loss" for t in request.triggers):
            self._best_snapshots[request.step] = result.path
            for step in sorted(self._best_snapshots)[:-_BEST_REMEMBERED]:
                del self._best_snapshots[step]
            # at most keep_best best models at once, in run and replay alike
            enforce_keep_best(self.writer, self.pipeline.config.snapshot.keep_best, self.log)
        getattr(self.log, request.severity.value)(
            "Created snapshot",
            step=request.step, triggers=[t.name for t in request.triggers],
            severity=request.severity.value, checkpoint=ck.name if ck else "none",
            mode=result.mode or "none", path=str(result.path),
        )
        self.emit(SnapshotMade(request, result.path, result.bytes))

    def _checkpoint_for(self, request: SnapshotRequest) -> Checkpoint | None:
        if request.exact_checkpoint:
            exact = self.index.get(request.step)
            if exact is not None:
                return exact
        return self.index.newest_at_or_before(request.step)

    def _failed(self, request: SnapshotRequest, reason: str, detail: str) -> None:
        self.counts["snapshot_failures"] += 1
        self.log.error(
            "Snapshot failed", step=request.step, triggers=[t.name for t in request.triggers],
            severity=request.severity.value, reason=reason, detail=detail or None,
        )
        self.emit(SnapshotFailed(request, reason))
