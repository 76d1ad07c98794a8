"""The shell around the pure pipeline, shared by ``run`` and ``replay``: ``ingest``
turns lines into records for the pipeline, ``dispatch`` turns its outcomes into log
lines, events and snapshots; the engine owns them, the checkpoint scans and the state."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from smart_monitor.config import Config
from smart_monitor.events import Listener
from smart_monitor.outputs.snapshot import SnapshotWriter
from smart_monitor.pipeline import Pipeline
from smart_monitor.runtime.dispatch import Dispatch
from smart_monitor.runtime.ingest import Ingest
from smart_monitor.series import SeriesBook
from smart_monitor.sources.checkpoints import Checkpoint, CheckpointIndex
from smart_monitor.triggers import Trigger

if TYPE_CHECKING:
    from smart_monitor.forensics.scan import CheckpointScanner

__all__ = ["Engine"]


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
        self.counts: Counter[str] = Counter()
        # the run's series, named by one rule for every reader (the sources share it)
        aliases = dict(config.records.aliases)
        if config.records.loss:
            aliases[config.records.loss] = "loss"
        self.series = SeriesBook(aliases)
        self.dispatch = Dispatch(
            log, self.pipeline, index, writer, config.snapshot.checkpoint_wait_seconds,
            self.counts, clock,
        )
        self.ingest = Ingest(
            self.pipeline, self.dispatch.act, log, aliases, config.records.max_line_bytes,
            self.counts, clock, self.series,
        )
        self.scanner: CheckpointScanner | None = None
        if config.checkpoint_scan.enabled:  # imported only when on
            from smart_monitor.forensics.scan import CheckpointScanner

            self.scanner = CheckpointScanner(config.checkpoint_scan)

    @property
    def listeners(self) -> list[Listener]:
        return self.dispatch.listeners

    # -- start-up -------------------------------------------------------------------
    def recover(self) -> None:
        """Remove half-made snapshots and learn which ones exist (idempotent restarts)."""
        for tmp in self.writer.remove_temporaries():
            self.log.warning("Removed unfinished snapshot", path=str(tmp))
        self.dispatch.remember(str(m["key"]) for _, m in self.writer.published() if "key" in m)
        self.dispatch.resume_pins()

    # -- checkpoints ----------------------------------------------------------------
    def scan_checkpoints(self) -> list[Checkpoint]:
        new = self.index.scan()
        for path, why in self.index.problems:  # once per path; it is skipped meanwhile
            self.log.error("Checkpoint unreadable", path=str(path), error=why,
                           hint="the trainer's umask or the folder's mode; retried at each scan")
        self.index.problems.clear()
        for ck in new:
            self.log.info("Checkpoint complete", name=ck.name, step=ck.step)
            self.pipeline.checkpoint_seen(ck.step)  # a step before it is a new run (#52)
            if self.scanner is not None:
                self.scanner.submit(ck)  # read off this thread; poll() collects it
        return new

    def collect_scans(self, wait: bool = False, timeout: float | None = None) -> None:
        """Log the finished checkpoint scans and act on their triggers."""
        if self.scanner is None or not self.scanner.busy:
            return
        for result in self.scanner.collect(wait, timeout):
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
        self.dispatch.act(self.pipeline.external(step, triggers, metrics))

    # -- turns ----------------------------------------------------------------------
    def poll(self) -> None:
        """Make the waiting snapshots whose checkpoint arrived or whose wait ran out,
        and act on the checkpoint scans that finished."""
        self.collect_scans()
        self.dispatch.poll()
        self.ingest.watch.after()  # a run gone quiet without a loss series is still said

    def end_run(self) -> None:
        """The run is over (the end of a replay: not a stop of ``run``, the trainer may
        go on): the conclusions that wait for a run's end are drawn."""
        outcome = self.pipeline.end_run()
        if outcome is not None:
            self.dispatch.act(outcome)

    def finish(self, scan_timeout: float | None = None) -> None:
        """On stop or at the end of a replay: make what waits with what exists (the
        checkpoint scans already started are waited for: their verdict is the point;
        a stop waits ``scan_timeout`` at most, and says which it gave up on)."""
        self.scan_checkpoints()
        self.collect_scans(wait=True, timeout=scan_timeout)
        if self.scanner is not None:
            abandoned = self.scanner.close()  # a later scan would start another thread
            if abandoned:
                self.counts["scans_abandoned"] += len(abandoned)
                self.log.warning("Checkpoint scans abandoned at stop", count=len(abandoned),
                                 names=[ck.name for ck in abandoned])
        self.dispatch.flush()

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"pipeline": self.pipeline.state_dict(), "counts": dict(self.counts),
                 "series": self.series.state_dict()}  # fmt: skip
        if self.scanner is not None:
            state["checkpoint_scan"] = self.scanner.detector.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pipeline.load_state_dict(state.get("pipeline", {}))
        self.series.load_state_dict(state.get("series", {}))
        self.counts.update(state.get("counts", {}))
        if self.scanner is not None:
            self.scanner.detector.load_state_dict(state.get("checkpoint_scan", {}))
