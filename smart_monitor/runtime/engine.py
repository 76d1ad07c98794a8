"""The shell around the pure pipeline, shared by ``run`` and ``replay``: parse lines,
log every event, make snapshots (idempotently), wait for a best model's checkpoint."""

from __future__ import annotations

import json
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson

from smart_monitor.batch import Row, blocking_keys, blocks, train_row
from smart_monitor.config import Config
from smart_monitor.outputs.copier import Copier, CopyDone, CopyJob
from smart_monitor.outputs.snapshot import SnapshotError, SnapshotResult, SnapshotWriter, json_safe
from smart_monitor.pipeline import Outcome, Pipeline, SnapshotRequest
from smart_monitor.policy import Incident
from smart_monitor.records import MalformedLine, Record, parse_line, to_record
from smart_monitor.sources.checkpoints import Checkpoint, CheckpointIndex
from smart_monitor.triggers import Trigger

if TYPE_CHECKING:
    from smart_monitor.forensics.scan import CheckpointScanner

__all__ = ["Engine"]

_MALFORMED_LOG_FIRST = 100  # then one line in every _MALFORMED_LOG_EVERY
_MALFORMED_LOG_EVERY = 1000
_VANISHED_RETRIES = 3
_COPY_STOP_SECONDS = 1.0  # at stop, a copy that ends within this is kept; later ones abandoned


@dataclass(slots=True)
class _Pending:
    request: SnapshotRequest
    deadline: float


class Engine:
    def __init__(
        self,
        config: Config,
        log: Any,
        index: CheckpointIndex,
        writer: SnapshotWriter,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.log = log
        self.index = index
        self.writer = writer
        self.clock = clock
        self.pipeline = Pipeline(config)
        self.aliases = config.records.aliases
        self.blocking = blocking_keys(self.aliases)
        self.counts: Counter[str] = Counter()
        self.snapshots_by_kind: Counter[str] = Counter()
        self.pending: list[_Pending] = []
        self.done_keys: set[str] = set()
        self.listeners: list[Callable[[str, Mapping[str, Any]], None]] = []
        self.incident_snapshots: dict[str, Path] = {}  # open incident id -> its snapshot
        self.last_record_at: float | None = None  # clock() of the last record (metrics)
        self.scanner: CheckpointScanner | None = None
        self.copier: Copier | None = None  # set by the daemon: copies then run off the worker
        if config.checkpoint_scan.enabled:  # imported only when on
            from smart_monitor.forensics.scan import CheckpointScanner

            self.scanner = CheckpointScanner(config.checkpoint_scan)

    # -- start-up -------------------------------------------------------------------
    def recover(self) -> None:
        """Remove half-made snapshots and learn which ones exist (idempotent restarts)."""
        for tmp in self.writer.remove_temporaries():
            self.log.warning("Removed unfinished snapshot", path=str(tmp))
        self.done_keys = {str(m["key"]) for _, m in self.writer.published() if "key" in m}

    def scan_checkpoints(self) -> list[Checkpoint]:
        new = self.index.scan()
        for ck in new:
            self.log.info("Checkpoint complete", name=ck.name, step=ck.step)
            if self.scanner is not None:
                self.scanner.submit(ck)  # read off this thread; poll() collects it
        return new

    def collect_scans(self, wait: bool = False) -> None:
        """Log the finished checkpoint scans and act on their triggers."""
        if self.scanner is None or not self.scanner.busy:
            return
        for result in self.scanner.collect(wait):
            ck = result.checkpoint
            if result.inspection is None:
                self.counts["scan_failures"] += 1
                self.log.warning(
                    "Checkpoint scan failed", name=ck.name, step=ck.step, error=result.error
                )
                continue
            self.counts["scans"] += 1
            self.log.info(
                "Checkpoint scanned", name=ck.name, step=ck.step,
                global_norm=round(result.inspection.global_norm, 6),
                nonfinite_tensors=len(result.inspection.nonfinite),
            )
            if result.triggers:
                self.handle_triggers(ck.step, result.triggers, result.summary())

    def handle_triggers(
        self, step: int, triggers: tuple[Trigger, ...], metrics: Mapping[str, Any]
    ) -> None:
        """Triggers produced outside the record stream go the normal way: detection
        log lines, policy, snapshot."""
        self._act(self.pipeline.external(step, triggers, metrics))

    # -- records --------------------------------------------------------------------
    def handle_line(self, line: bytes, offset: int | None = None) -> None:
        if line[:1] == b"\x00":  # copytruncate with a stale writer (FAULTS.md #7)
            stripped = line.lstrip(b"\x00")
            self.counts["nul_bytes_skipped"] += len(line) - len(stripped)
            self.log.warning("Skipped NUL run", bytes=len(line) - len(stripped), offset=offset)
            line = stripped
        try:
            record = parse_line(line, self.aliases)
        except MalformedLine as exc:
            self.malformed(exc.reason, exc.detail, offset)
            return
        if record is not None:
            self.handle_record(record)

    def handle_lines(self, lines: list[bytes | None], offset: int) -> None:
        """``handle_line`` for consecutive lines from byte ``offset`` on, as
        ``iter_line_chunks`` yields them (``None``: a line over ``max_line_bytes``), with
        the same outcome, faster: the plain train records take the pipeline's bulk path,
        every other line goes through ``handle_line`` in its turn among them. The loop
        is the replay's hot path: it does no more per line than it must."""
        try:  # one C-level loop while every line parses, which is nearly always
            parsed: list[Any] = list(map(orjson.loads, lines))  # type: ignore[arg-type]  # None
        except (orjson.JSONDecodeError, TypeError):  # a blank, bad, NaN or oversized line
            parsed = [_loads_or_none(line) for line in lines]
        blocking = self.blocking
        found = [train_row(d, blocking) for d in parsed]
        others = _indexes_of_none(found)
        rows: list[Row] = list(filter(None, found)) if others else cast(list[Row], found)
        between: list[tuple[int, Callable[[], None]]] = []
        done = 0  # lines whose length is in ``offset``
        for before, i in enumerate(others):
            line = lines[i]
            offset += sum(map(len, lines[done:i])) + i - done  # type: ignore[arg-type]
            done = i
            k = i - before  # the train rows ahead of it
            if line is None:
                limit = self.config.records.max_line_bytes
                report = partial(self.malformed, "oversized", f"line over {limit} bytes", offset)
                between.append((k, report))
            elif line:
                between.append((k, partial(self.handle_line, line, offset)))
        self._handle_rows(rows, between)

    def handle_entries(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """``handle_entry`` for many decoded entries, like ``handle_lines``."""
        rows: list[Row] = []
        between: list[tuple[int, Callable[[], None]]] = []
        for entry in entries:
            row = train_row(entry, self.blocking)
            if row is not None:
                rows.append(row)
            else:
                between.append((len(rows), partial(self.handle_entry, entry)))
        self._handle_rows(rows, between)

    def _handle_rows(self, rows: list[Row], between: list[tuple[int, Callable[[], None]]]) -> None:
        """``rows`` block by block, each with the other records (``between``: before
        row k) that fall among its rows; those after the last row at the end."""
        self.counts["records"] += len(rows)
        if rows:
            self.last_record_at = self.clock()
        pending = deque(between)
        for start, block in blocks(rows):
            end = start + len(block)
            mine = []
            while pending and pending[0][0] < end:
                k, handle = pending.popleft()
                mine.append((k - start, handle))
            self.pipeline.process_block(block, self._act, mine)
        for _, handle in pending:
            handle()

    def handle_entry(self, entry: Mapping[str, Any]) -> None:
        """One already-decoded entry (a ``trainer_state.json`` log_history item)."""
        try:
            record = to_record(entry, self.aliases)
        except MalformedLine as exc:
            self.malformed(exc.reason, exc.detail, None)
            return
        if record is not None:
            self.handle_record(record)

    def malformed(self, reason: str, detail: str, offset: int | None) -> None:
        n = self.counts["malformed"] = self.counts["malformed"] + 1
        if n <= _MALFORMED_LOG_FIRST or n % _MALFORMED_LOG_EVERY == 0:
            self.log.warning(
                "Skipped malformed line",
                reason=reason, detail=detail or None, offset=offset, count=n,
            )
        self._emit("malformed", {"reason": reason})

    def handle_record(self, record: Record) -> None:
        self.counts["records"] += 1
        self.last_record_at = self.clock()
        outcome = self.pipeline.process(record)
        if outcome is not None:
            self._act(outcome)

    def _act(self, outcome: Outcome) -> None:
        if outcome.restarted_after is not None:
            self.log.warning(
                "Trainer restarted",
                step=outcome.step,
                previous_step=outcome.restarted_after,
                segment=self.pipeline.segment,
            )
            self._emit("restarted", {"step": outcome.step})
        for t in outcome.triggers:
            self._detected(t)
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
            self._record_recovery(incident, outcome.step)

    def _detected(self, t: Trigger) -> None:
        self.counts["detections"] += 1
        value = t.details.get("z", t.details.get("value"))
        getattr(self.log, t.severity.value)(
            "Detected anomaly",
            step=t.step, trigger=t.name, severity=t.severity.value, value=value,
        )
        self._emit("detected", {"trigger": t.kind, "severity": t.severity.value, "step": t.step})

    # -- snapshots ------------------------------------------------------------------
    def _request(self, request: SnapshotRequest) -> None:
        if request.key in self.done_keys or (self.copier and self.copier.holds(request.key)):
            self.log.debug("Snapshot already exists", step=request.step, key=request.key)
            return
        wait = self.config.snapshot.checkpoint_wait_seconds if request.exact_checkpoint else 0.0
        if wait > 0 and self.index.get(request.step) is None:
            self.pending.append(_Pending(request, self.clock() + wait))
            return
        self._snapshot(request)

    def poll(self) -> None:
        """Make the waiting snapshots whose checkpoint arrived or whose wait ran out,
        and act on the checkpoint scans that finished."""
        self.collect_scans()
        if self.copier is not None:
            for done in self.copier.collect():
                self._copied(done)
        if not self.pending:
            return
        now = self.clock()
        still = []
        newest = max(self.index.complete, default=-1)
        for p in self.pending:
            # a checkpoint past the step means checkpoint-<step> will never come (the
            # trainer saves in order): fall back now, before rotation deletes the others
            step = p.request.step
            if self.index.get(step) is not None or now >= p.deadline or newest > step:
                self._snapshot(p.request)
            else:
                still.append(p)
        self.pending = still

    def finish(self) -> None:
        """On stop or at the end of a replay: make what waits with what exists (the
        checkpoint scans already started are waited for: their verdict is the point)."""
        self.scan_checkpoints()
        self.collect_scans(wait=True)
        if self.scanner is not None:
            self.scanner.close()  # its thread; a later scan would start another
        pending, self.pending = self.pending, []
        for p in pending:
            self._snapshot(p.request)
        if self.copier is not None:  # a stop waits a little for copies, then abandons them
            copier, self.copier = self.copier, None
            for done in copier.close(_COPY_STOP_SECONDS):
                self._copied(done)

    @property
    def waiting(self) -> bool:
        """A snapshot still to be made: a best model waiting for its checkpoint, or a
        copy in flight. A state saved now would put the offset past its record."""
        return bool(self.pending) or (self.copier is not None and self.copier.busy)

    def _snapshot(self, request: SnapshotRequest, vanished: tuple[str, ...] = ()) -> None:
        """Make the snapshot: on this thread when it links (milliseconds), on the copier
        when it copies. ``vanished``: the candidate checkpoints already rotated away."""
        metadata = dict(request.metadata)
        metadata["key"] = request.key
        while True:
            # the trainer may rotate away every candidate while we read a backlog: after
            # a few, the snapshot keeps its metadata alone rather than nothing at all
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
            self.incident_snapshots[metadata["incident"]["id"]] = result.path
        for t in request.triggers:
            self.snapshots_by_kind[t.kind] += 1
        getattr(self.log, request.severity.value)(
            "Created snapshot",
            step=request.step, triggers=[t.name for t in request.triggers],
            severity=request.severity.value, checkpoint=ck.name if ck else "none",
            mode=result.mode or "none", path=str(result.path),
        )
        self._emit("snapshot", {"request": request, "path": result.path, "bytes": result.bytes})

    def _record_recovery(self, incident: Incident, step: int) -> None:
        """Complete the snapshot's ``incident`` block (peak, end) once it recovered:
        written to a temporary name, synced, renamed, like every published file."""
        path = self.incident_snapshots.pop(incident.id, None)
        if path is None:
            return
        target = path / "metadata.json"
        tmp = path / ".metadata.json.tmp"
        try:
            meta = json.loads(target.read_bytes())
            meta["incident"] = {
                **meta.get("incident", {}), **incident.block(), "status": "recovered",
                "recovered_step": step,
            }
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(json_safe(meta), indent=2) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except (OSError, ValueError) as exc:  # deleted by retention, or by hand
            self.log.warning("Incident not recorded", incident=incident.id, error=str(exc))

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
        self._emit("snapshot_failed", {"request": request, "reason": reason})

    def _emit(self, event: str, data: Mapping[str, Any]) -> None:
        for listener in self.listeners:
            try:
                listener(event, data)
            except Exception as exc:  # a listener (metrics, actions) must never stop us
                self.log.error("Listener failed", event_name=event, error=repr(exc))

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"pipeline": self.pipeline.state_dict(), "counts": dict(self.counts)}
        if self.scanner is not None:
            state["checkpoint_scan"] = self.scanner.detector.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pipeline.load_state_dict(state.get("pipeline", {}))
        self.counts.update(state.get("counts", {}))
        if self.scanner is not None:
            self.scanner.detector.load_state_dict(state.get("checkpoint_scan", {}))


def _loads_or_none(line: bytes | None) -> Any:
    try:
        return orjson.loads(line)  # type: ignore[arg-type]
    except (orjson.JSONDecodeError, TypeError):
        return None


def _indexes_of_none(items: list[Any]) -> list[int]:
    """Where ``None`` stands in ``items``: ``list.index`` scans in C, and there are
    few (an eval or example record among hundreds of train records)."""
    found: list[int] = []
    i = -1
    try:
        while True:
            i = items.index(None, i + 1)
            found.append(i)
    except ValueError:
        return found
