"""Outcomes to log lines, events and snapshots: the pipeline decides, this acts.

A snapshot is made once per key (a restart that re-reads lines asks for the same key),
waits a while for a new best model's own checkpoint, and survives the trainer rotating
its checkpoints away while we read a backlog: after a few vanished candidates it keeps
its metadata alone rather than nothing at all."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smart_monitor.events import (
    Detected,
    Event,
    IncidentRecovered,
    IncidentSettled,
    Listener,
    Restarted,
    SnapshotFailed,
    SnapshotMade,
)  # fmt: skip
from smart_monitor.outputs.copier import Copier, CopyDone, CopyJob
from smart_monitor.outputs.incident import record_end
from smart_monitor.outputs.snapshot import (
    SnapshotError,
    SnapshotResult,
    SnapshotWriter,
    pending_metadata,
    update_pin,
)  # fmt: skip
from smart_monitor.pipeline import Outcome, Pipeline, SnapshotRequest
from smart_monitor.policy import Incident
from smart_monitor.runtime.pins import owed_pins
from smart_monitor.sources.checkpoints import Checkpoint, CheckpointIndex
from smart_monitor.triggers import Trigger, kind_of

__all__ = ["Dispatch"]

_VANISHED_RETRIES = 3
_BEST_REMEMBERED = 64  # best-model snapshots an overfitting conclusion may name
_COPY_STOP_SECONDS = 1.0  # at stop, a copy that ends within this is kept; later ones abandoned
_RETRY_FIRST = 2.0  # a pin that failed is retried after this, doubling (FAULTS.md #55)...
_RETRY_MAX = 60.0  # ...up to this, for as long as a candidate checkpoint exists


@dataclass(slots=True)
class _Waiting:
    request: SnapshotRequest
    deadline: float


@dataclass(frozen=True, slots=True)
class _Retry:
    """A pin to try again: into ``folder`` (its metadata-only snapshot), or the whole
    snapshot when not even the metadata could be written."""

    request: SnapshotRequest
    folder: Path | None
    at: float


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
        self._incident_snapshots: dict[str, list[Path]] = {}  # open incident id -> snapshots
        self._retries: dict[str, _Retry] = {}  # by snapshot key
        self._failures: dict[str, int] = {}  # failed pins in a row, by snapshot key
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
        times = [w.deadline for w in self._waiting] + [r.at for r in self._retries.values()]
        return min(times, default=None)

    def resume_pins(self) -> None:
        """At start: retry the pins a SIGKILL or a failure left owed (``pins.py``)."""
        for request, folder in owed_pins(self.writer):
            self._retries[request.key] = _Retry(request, folder, self.clock())

    def remember(self, keys: Iterable[str]) -> None:
        """Keys of snapshots made before (found on disk, or removed by retention)."""
        self.done_keys.update(keys)

    # -- outcomes -------------------------------------------------------------------
    def act(self, outcome: Outcome) -> None:
        if outcome.ended is not None:  # the previous run's conclusions come first
            self.act(outcome.ended)
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
        for status in ("recovered", "settled"):
            for incident in outcome.extra.get(status, ()):
                self._ended(incident, outcome.step)

    def _ended(self, incident: Incident, step: int) -> None:
        """An incident recovered (info) or settled at a worse loss level (warning): the
        log line, its snapshots' metadata, the event an alert resolves on, or not."""
        settled = incident.status == "settled"
        getattr(self.log, "warning" if settled else "info")(
            "Incident settled" if settled else "Incident recovered",
            step=step, incident=incident.id, problem=incident.problem,
            started=incident.started, peak_step=incident.peak_step,
            peak_trigger=incident.peak_trigger, last_detection=incident.last,
            detections=incident.detections, severity=incident.severity, **incident.levels(),
        )
        paths = self._incident_snapshots.pop(incident.id, [])
        for path in paths:
            try:
                record_end(path, incident.block(), step)
            except (OSError, ValueError) as exc:  # deleted by retention, or by hand
                self.log.warning("Incident not recorded", incident=incident.id, error=str(exc))
        common = (incident.id, incident.problem, incident.started, step, incident.severity)
        if settled:
            assert incident.level_before is not None and incident.level_now is not None
            first = incident.kinds[0] if incident.kinds else kind_of(incident.peak_trigger)
            self.emit(IncidentSettled(
                *common, incident.level_before, incident.level_now, incident.ratio, first
            ))
        else:
            self.emit(IncidentRecovered(
                *common, incident.peak_trigger, paths[-1] if paths else None,
                incident.level_before, incident.level_now,
            ))

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
        now = self.clock()
        for key, retry in list(self._retries.items()):
            if now >= retry.at:
                del self._retries[key]
                if retry.folder is None:
                    self._snapshot(retry.request)
                else:
                    self._pin_into(retry.request, retry.folder)
        if not self._waiting:
            return
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
        """Make the snapshot: on this thread when it links (milliseconds). A copy takes
        minutes: the snapshot is published at once with its metadata alone (the actions
        fire now, never behind a copy: FAULTS.md #57) and its ``model/`` is copied in on
        the copier. ``vanished``: the candidate checkpoints already rotated away."""
        metadata = {**request.metadata, "key": request.key}
        if "overfitting" in metadata:  # the best model the conclusion names
            metadata["overfitting"] = self._best_model(metadata["overfitting"])
        while True:
            ck = None if len(vanished) >= _VANISHED_RETRIES else self._checkpoint_for(request)
            if ck is None and vanished:
                metadata["note"] = _vanished_note(vanished)
            if ck is not None and self.copier is not None and self.writer.copies(ck):
                self._copy_later(request, metadata, ck, vanished)
                return
            try:
                result = self.writer.write(request.name, metadata, ck)
            except SnapshotError as exc:
                if exc.reason == "source_vanished" and ck is not None:
                    vanished = self._vanished(request, ck, exc, vanished)
                    continue
                self._pin_failed(request, None, metadata, ck, exc.reason, exc.detail)
                return
            except OSError as exc:
                self._pin_failed(request, None, metadata, ck, "io_error", str(exc))
                return
            self._published(request, metadata, result, announce=False)
            self._created(request, ck, result)
            self.emit(SnapshotMade(request, result.path, result.bytes))
            return

    def _copy_later(
        self, request: SnapshotRequest, metadata: dict[str, Any], ck: Checkpoint,
        vanished: tuple[str, ...],
    ) -> None:
        assert self.copier is not None
        pending = pending_metadata(metadata, ck.name, "copying",
                                   f"{ck.name} is being copied into model/")
        try:
            result = self.writer.write(request.name, pending, None)
        except (SnapshotError, OSError) as exc:
            self._pin_failed(request, None, metadata, ck, "io_error", str(exc))
            return
        self.log.info("Snapshot pending", step=request.step, checkpoint=ck.name,
                      reason="copying", path=str(result.path))
        self._published(request, pending, result, announce=True)
        self.copier.submit(CopyJob(request.key, request.name, pending, ck, (request, vanished),
                                   result.path))

    def _pin_into(
        self, request: SnapshotRequest, folder: Path, vanished: tuple[str, ...] = ()
    ) -> None:
        """Give a published metadata-only snapshot its checkpoint: after a vanished
        candidate, or when a failed pin is retried (#55)."""
        while True:
            ck = None if len(vanished) >= _VANISHED_RETRIES else self._checkpoint_for(request)
            if ck is None:
                self._settle(request, folder, _vanished_note(vanished) if vanished else
                             "no complete checkpoint existed before this step")
                return
            if self.copier is not None and self.writer.copies(ck):
                self.copier.submit(CopyJob(request.key, request.name, {}, ck,
                                           (request, vanished), folder))
                return
            try:
                result = self.writer.pin_into(folder, ck)
            except SnapshotError as exc:
                if exc.reason == "source_vanished":
                    vanished = self._vanished(request, ck, exc, vanished)
                    continue
                self._pin_failed(request, folder, {}, ck, exc.reason, exc.detail)
                return
            except OSError as exc:
                self._pin_failed(request, folder, {}, ck, "io_error", str(exc))
                return
            self._created(request, ck, result)
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
        """A copy made off the worker ended: in place, vanished (try the next
        candidate), abandoned at stop (the metadata says so) or failed."""
        request, vanished = done.job.context
        ck, exc, folder = done.job.checkpoint, done.error, done.job.folder
        assert folder is not None  # the dispatcher publishes the metadata first
        if exc is None:
            assert done.result is not None
            self._created(request, ck, done.result)
        elif exc.reason == "source_vanished":
            self._pin_into(request, folder, self._vanished(request, ck, exc, vanished))
        elif exc.reason == "cancelled":
            self.log.warning("Copy abandoned", step=request.step, checkpoint=ck.name,
                             detail=exc.detail)
            self._settle(request, folder, f"stopped while copying {ck.name}: its copy was "
                         "abandoned")
        else:
            self._pin_failed(request, folder, {}, ck, exc.reason, exc.detail)

    def _vanished(
        self, request: SnapshotRequest, ck: Checkpoint, exc: SnapshotError,
        vanished: tuple[str, ...],
    ) -> tuple[str, ...]:
        self.log.warning("Checkpoint vanished", step=request.step, checkpoint=ck.name,
                         detail=exc.detail)
        self.index.forget(ck.step)
        return (*vanished, ck.name)

    def _published(
        self, request: SnapshotRequest, metadata: Mapping[str, Any], result: SnapshotResult,
        announce: bool,
    ) -> None:
        """A snapshot folder is in place (its ``model/`` may come later)."""
        self.done_keys.add(request.key)
        self.counts["snapshots"] += 1
        if "incident" in metadata:
            self._incident_snapshots.setdefault(metadata["incident"]["id"], []).append(
                result.path
            )
        if all(t.kind == "best_model_loss" for t in request.triggers):
            self._best_snapshots[request.step] = result.path
            for step in sorted(self._best_snapshots)[:-_BEST_REMEMBERED]:
                del self._best_snapshots[step]
        if announce:
            self.emit(SnapshotMade(request, result.path, result.bytes))

    def _created(
        self, request: SnapshotRequest, ck: Checkpoint | None, result: SnapshotResult
    ) -> None:
        """The snapshot is complete (its ``model/`` in place, or never to come)."""
        self._failures.pop(request.key, None)
        mode, _why = self.writer.mode_in_use
        if result.mode == "copy" and mode != "copy":  # a link refused since the start (#54)
            why = f"{ck.name if ck else 'a checkpoint'} could not be linked: copied in full"
            self.writer.mode_in_use = ("copy", why)
            self.log.warning("Snapshot mode", mode="copy", why=why, was=mode)
        getattr(self.log, request.severity.value)(
            "Created snapshot",
            step=request.step, triggers=[t.name for t in request.triggers],
            severity=request.severity.value, checkpoint=ck.name if ck else "none",
            mode=result.mode or "none", path=str(result.path),
        )

    def _settle(self, request: SnapshotRequest, folder: Path, note: str) -> None:
        """A metadata-only snapshot stays so: its metadata says why."""
        try:
            update_pin(folder, None, note)
        except (OSError, ValueError) as exc:  # removed by retention or by hand
            self.log.warning("Snapshot not updated", path=str(folder), error=str(exc))
            return
        self._created(request, None, SnapshotResult(folder, None, 0, 0))

    def _checkpoint_for(self, request: SnapshotRequest) -> Checkpoint | None:
        """A new best model keeps ``checkpoint-<step>`` itself (else the newest before);
        an anomaly at step S the newest checkpoint strictly before S (FAULTS.md #56): HF
        saves ``checkpoint-S`` after step S's update, so for a NaN at S it already holds
        the damaged weights. One rule whichever backend saw ``checkpoint-S`` first."""
        if request.exact_checkpoint:
            exact = self.index.get(request.step)
            return exact if exact is not None else self.index.newest_at_or_before(request.step)
        return self.index.newest_at_or_before(request.step - 1)

    def _pin_failed(
        self, request: SnapshotRequest, folder: Path | None, metadata: Mapping[str, Any],
        ck: Checkpoint | None, reason: str, detail: str,
    ) -> None:
        """A pin that could not be written (no space, EIO, EACCES): the anomaly keeps a
        metadata-only snapshot saying so, and the pin is retried with a doubling backoff
        while a candidate checkpoint exists (FAULTS.md #55). Logged once per snapshot."""
        self.counts["snapshot_failures"] += 1
        if reason == "snapshot_removed":  # retention removed it meanwhile: nothing to pin
            self.log.warning("Snapshot removed before its pin", step=request.step,
                             path=detail)
            return
        tries = self._failures[request.key] = self._failures.get(request.key, 0) + 1
        delay = min(_RETRY_FIRST * 2 ** (tries - 1), _RETRY_MAX)
        note = (f"{ck.name if ck else 'the checkpoint'} could not be pinned ({reason}): "
                "retried while it exists")
        if folder is None:
            try:
                pending = pending_metadata(metadata, ck.name if ck else None, reason, note)
                result = self.writer.write(request.name, pending, None)
                folder = result.path
                self._published(request, metadata, result, announce=False)
            except (SnapshotError, OSError):
                folder = None  # not even the metadata: the whole snapshot is retried
        else:
            with contextlib.suppress(OSError, ValueError):  # the log line says it anyway
                update_pin(folder, reason, note)
        if tries == 1:
            self.log.error(
                "Snapshot failed", step=request.step,
                triggers=[t.name for t in request.triggers], severity=request.severity.value,
                reason=reason, detail=detail or None, checkpoint=ck.name if ck else None,
                kept="metadata" if folder else "nothing", path=str(folder) if folder else None,
                retry_seconds=delay,
            )
            self.emit(SnapshotFailed(request, reason))
        self._retries[request.key] = _Retry(request, folder, self.clock() + delay)


def _vanished_note(vanished: tuple[str, ...]) -> str:
    return "every candidate checkpoint vanished before it was pinned: " + ", ".join(vanished)
