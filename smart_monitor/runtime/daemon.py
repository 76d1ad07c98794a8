"""``run``: follow a live training job until stopped.

The loop is boring on purpose. Observer threads only post wake-ups; this one worker
(the main thread, where signals land) reads new lines, scans checkpoints, makes
snapshots, saves state and pings systemd's watchdog. An exception in a turn is logged
and counted, and the next turn starts afresh: nothing dies silently (FAULTS.md #29).
Every ``reconcile_seconds`` the worker reads and scans as if every event had fired,
which catches what a lost event (#20) or a remote writer (#30) hid.

State (the tailer's offset and file identity, the detectors, cooldowns, counts) is
saved every ``save_interval_seconds`` and on stop, always between two records, so a
restart resumes at the first record not yet processed. A SIGKILL between a snapshot
and the next save makes the restart see a few records again: their snapshots already
exist under the same key, so nothing is made twice (#16, #25).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from smart_monitor.config import Config
from smart_monitor.events import Event, SnapshotMade
from smart_monitor.outputs.copier import Copier
from smart_monitor.outputs.log import DailyFile
from smart_monitor.outputs.retention import DiskBudget
from smart_monitor.outputs.snapshot import SnapshotWriter
from smart_monitor.outputs.state import StateStore
from smart_monitor.runtime.engine import Engine
from smart_monitor.runtime.housekeeping import Housekeeping
from smart_monitor.runtime.ingest import no_cyclic_gc
from smart_monitor.runtime.links import decide_links
from smart_monitor.runtime.notify import Notifier
from smart_monitor.sources.checkpoints import CheckpointIndex
from smart_monitor.sources.metrics_source import FolderSource, open_metrics
from smart_monitor.sources.tailer import Tailer
from smart_monitor.sources.watch import ObserverFactory, Wakeups, Watcher, make_observer

__all__ = ["Daemon"]

_TURN_SECONDS = 0.25  # a backlog is read in slices this long, so stop and pings stay prompt
_UNHEALTHY_AFTER = 3  # turns failing in a row before the watchdog pings stop
_RETIRED_KEYS = 1000  # keys of snapshots removed by retention, remembered in the state
_STATE_BACKOFF_MAX = 300.0  # a state folder that stays full is retried every 5 minutes
_ERROR_BACKOFF = 0.1  # a failing turn is retried after this, doubling (FAULTS.md #53)...
_ERROR_BACKOFF_MAX = 30.0  # ...up to this: never a busy loop on a persistent error
# A stop waits this long, at most, for checkpoint scans under way (a multi-GB read): the
# whole stop must end well inside systemd's TimeoutStopSec (60 s in the unit).
_SCAN_STOP_SECONDS = 5.0


# What the command line attaches to the engine at start (actions, metrics server,
# plots) given the plots' hold, and how to stop them: runtime drives the core and
# imports no hook; the layer above composes them.
Hooks = Callable[[Engine, Callable[[], bool], Callable[[], str]], Callable[[], None]]


class StopFlag:
    """A stop request. Set from a signal handler, which runs on the worker's own
    thread between two bytecodes: ``threading.Event.set`` takes a lock that thread may
    be holding, a plain attribute write takes none."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class Daemon:
    def __init__(
        self,
        config: Config,
        log: Any,
        daily: DailyFile | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        observer_factory: ObserverFactory = make_observer,
        hooks: Hooks | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.hooks = hooks
        self.daily = daily
        self.notifier = notifier or Notifier({})
        self.clock = clock
        self.wakeups = Wakeups()
        self.stopping = StopFlag()
        self.index = CheckpointIndex(config.checkpoint_dir, config.checkpoints, clock)
        self.writer = SnapshotWriter(config.snapshot_dir, config.snapshot.mode)
        self.engine = Engine(config, log, self.index, self.writer, clock)
        self.engine.dispatch.copier = Copier(self.writer, lambda: self.wakeups.post("copied"))
        self.housekeeping = Housekeeping(self.writer, config.snapshot, self.index, log, clock)
        self.store = StateStore(config.state_dir)
        # the JSONL tailer, or a follower of TensorBoard or CSV files (by the path)
        self.tailer = open_metrics(
            config.metrics_file, config.source.format, config.records,
            config.source.quiet_seconds, self._tail_event, self.engine.ingest.malformed, clock,
            self.engine.series,
        )
        self.watcher = Watcher(
            config.metrics_file, config.checkpoint_dir, config.watch.backend, self.wakeups, log,
            observer_factory,
        )
        self.errors = 0
        self.errors_in_row = 0
        self.behind = False  # the last read stopped at its turn's end: a backlog
        self.retired: list[str] = []
        self.state_failures = 0
        self.state_error: str | None = None
        self._dirty = False
        self._next_save = self._next_reconcile = self._next_ping = self._next_poll = 0.0
        self._retry_at = 0.0  # after a failed turn, wake-ups wait until then
        self._held: set[str] = set()

    # -- control (safe from signal handlers: a flag and a post, no lock) -------------
    def stop(self) -> None:
        self.stopping.set()
        self.wakeups.post("stop")

    def reopen_log(self) -> None:
        self.wakeups.post("reopen")

    # -- the loop -------------------------------------------------------------------
    def run(self) -> int:
        close_hooks = self._start()
        try:
            while not self.stopping.is_set():
                kinds = self.wakeups.take(self._timeout())
                if self.stopping.is_set():
                    break
                if self.clock() < self._retry_at:  # backing off after a failed turn
                    self._held |= kinds
                    continue
                kinds, self._held = kinds | self._held, set()
                self._turn(kinds)
        finally:
            self._finish(close_hooks)
        return 0

    def _start(self) -> Callable[[], None]:
        cfg = self.config
        for d in (cfg.state_dir, cfg.snapshot_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.engine.recover()
        links = decide_links(cfg)  # the verdict `run` checked at start, for the log and /metrics
        self.writer.mode_in_use = (links.mode, links.why)
        (self.log.warning if links.problem else self.log.info)(
            "Snapshot mode", mode=links.mode, why=links.why)
        data, source = self.store.load()
        if data is not None:
            self.engine.load_state_dict(data.get("engine", {}))
            if self.tailer is not None:
                self.tailer.load_state_dict(data.get("tailer", {}))
            self.retired = [str(k) for k in data.get("retired_keys", [])][-_RETIRED_KEYS:]
            self.engine.dispatch.remember(self.retired)
        self.engine.listeners.append(self._on_event)
        close_hooks = (
            self.hooks(
                self.engine, lambda: self.behind and not self.stopping.is_set(), self._status
            )
            if self.hooks is not None else lambda: None
        )
        self.watcher.start()
        self.log.info(
            "Started", mode="run", metrics=str(cfg.metrics_file),
            checkpoints=str(cfg.checkpoint_dir), backend=self.watcher.kind, state=source or "fresh",
        )
        self.notifier.ready(self._status())
        self._next_ping = self.clock()
        self._next_save = self.clock() + cfg.state.save_interval_seconds
        return close_hooks

    def _timeout(self) -> float:
        if self._retry_at > self.clock():
            return self._retry_at - self.clock()
        deadlines = [self._next_reconcile, self._next_ping]
        if self.watcher.kind == "polling":
            deadlines.append(self._next_poll)
        if self._dirty:
            deadlines.append(self._next_save)
        waited = self.engine.dispatch.next_deadline()
        if waited is not None:
            deadlines.append(waited)
        if isinstance(self.tailer, FolderSource):
            deadlines.append(self.tailer.deadline)  # a gathered step's quiet period
        return min(deadlines) - self.clock()

    def _turn(self, kinds: set[str]) -> None:
        try:
            now = self.clock()
            full = now >= self._next_reconcile
            if full:
                self._next_reconcile = now + self.config.watch.reconcile_seconds
            if "checkpoints" in kinds:  # an event: a file replaced in a checkpoint may
                self.housekeeping.due = True  # leave a pin holding its bytes alone
            if self.watcher.kind == "polling" and now >= self._next_poll:
                self._next_poll = now + self.config.watch.poll_interval
                kinds |= {"metrics", "checkpoints"}  # what an observer would have said
            if "reopen" in kinds and self.daily is not None:
                self.daily.reopen()
            if self.watcher.check():
                full = True
            if full or kinds & {"checkpoints", "rescan"} or self.engine.dispatch.waiting:
                self.engine.scan_checkpoints()
            quiet = isinstance(self.tailer, FolderSource) and now >= self.tailer.deadline
            if full or kinds & {"metrics", "rescan"} or quiet:
                self._read()
            if full:
                self.housekeeping.watch_linked()
            self.engine.poll()
            if self.housekeeping.due or full:  # full: rotation makes old pins cost bytes
                self._retain()
            if self._dirty and self.clock() >= self._next_save:
                self._save(final=False)
            self.errors_in_row = 0
        except Exception as exc:  # one bad turn must not end the watch
            self.errors += 1
            self.errors_in_row += 1
            if self.errors_in_row <= _UNHEALTHY_AFTER or self.errors % 100 == 0:
                frame = traceback.extract_tb(exc.__traceback__)[-1]
                self.log.error(
                    "Worker error", error=repr(exc), where=f"{frame.filename}:{frame.lineno}",
                    errors=self.errors,
                )
            delay = min(_ERROR_BACKOFF * 2 ** (self.errors_in_row - 1), _ERROR_BACKOFF_MAX)
            self._retry_at = self.clock() + delay
            self.wakeups.post("rescan")  # retry the rest then
        self._report()

    def _read(self) -> None:
        if self.tailer is None:
            return
        if isinstance(self.tailer, FolderSource):
            self._read_entries(self.tailer)
            return
        if self._drain(self._handle_blocks(self.tailer)):
            return
        if self.tailer.switched:  # the old file is drained: save at the boundary, go on
            self.tailer.switched = False
            self._save(final=True)
            self.wakeups.post("metrics")

    def _handle_blocks(self, tailer: Tailer) -> Iterator[None]:
        """Each block the tailer gives, handled (the path replay takes), then committed:
        its offset moves past it only once its lines are handled."""
        handle = self.engine.ingest.handle_lines
        for offset, lines in tailer.blocks():
            handle(lines, offset)
            tailer.commit()
            yield

    def _read_entries(self, source: FolderSource) -> None:
        """``_read`` for TensorBoard and CSV files: decoded entries, in slices."""
        self._drain(map(self.engine.ingest.handle_entries, source.batches()))

    def _drain(self, handled: Iterator[None]) -> bool:
        """Run ``handled`` (each step handles what one read returned) for one turn at
        most; True when it stopped early (a stop, or a backlog left for the next turn)."""
        deadline = self.clock() + _TURN_SECONDS
        with no_cyclic_gc():
            for _ in handled:
                self._dirty = True
                if self.stopping.is_set():
                    return True
                if self.clock() >= deadline:
                    self.wakeups.post("metrics")  # a backlog: come back after other duties
                    self.behind = True
                    return True
        self.behind = False
        return False

    def _on_event(self, event: Event) -> None:
        if isinstance(event, SnapshotMade):
            self.housekeeping.due = True

    def _tail_event(self, name: str, fields: Mapping[str, Any]) -> None:
        quiet = name in (
            "Opened metrics file", "Resumed metrics file",
            "Metrics file rewritten", "Waiting for truncated event record",  # a trainer's norm
        )
        (self.log.info if quiet else self.log.warning)(name, **fields)
        self._dirty = True

    def _retain(self) -> None:
        self.retired += self.housekeeping.retain()
        del self.retired[:-_RETIRED_KEYS]

    @property
    def budget(self) -> DiskBudget | None:
        return self.housekeeping.budget

    # -- state ----------------------------------------------------------------------
    def _save(self, final: bool) -> None:
        """Skipped while a best model waits for its checkpoint (a kill would lose the
        wait: the saved offset stays before it), unless ``final``: on stop, after
        finish(), and when the metrics file was replaced."""
        if self.engine.dispatch.waiting and not final:
            self._next_save = self.clock() + self.config.state.save_interval_seconds
            return
        data = {
            "engine": self.engine.state_dict(),
            "tailer": self.tailer.state_dict() if self.tailer is not None else {},
            "retired_keys": self.retired,
        }
        interval = self.config.state.save_interval_seconds
        try:
            self.store.save(data)
        except OSError as exc:  # full or unwritable (FAULTS.md #33): retry later, go on
            self.state_failures += 1
            delay = min(interval * 2**self.state_failures, _STATE_BACKOFF_MAX)
            self.state_error = f"{self.store.path}: {exc.strerror or exc}"
            if self.state_failures == 1:
                self.log.error("State save failed", path=str(self.store.path),
                               error=exc.strerror or str(exc), retry_seconds=delay)
            self._next_save = self.clock() + delay
            return
        if self.state_failures:
            self.log.info("State saved again", path=str(self.store.path),
                          failures=self.state_failures)
            self.state_failures, self.state_error = 0, None
        self._dirty = False
        self._next_save = self.clock() + interval

    # -- health ---------------------------------------------------------------------
    def _status(self) -> str:
        if self.tailer is not None and self.tailer.waiting:
            return f"waiting for {self.config.metrics_file}"
        degraded = []
        if self.watcher.degraded:
            degraded.append("polling (inotify limits reached)")
        if self.daily is not None and self.daily.error:
            lost = self.daily.lost
            degraded.append(f"log to stderr only, {lost} lines lost ({self.daily.error})")
        if self.state_error:
            degraded.append(f"state not saved ({self.state_error})")
        if self.budget is not None and self.budget.low:
            degraded.append("snapshot disk under its free-space floor")
        if degraded:
            return "degraded: " + "; ".join(degraded)
        return f"following ({self.watcher.kind})"

    @property
    def healthy(self) -> bool:
        return self.watcher.healthy and self.errors_in_row < _UNHEALTHY_AFTER

    def _report(self) -> None:
        self.notifier.status(self._status())
        interval = self.notifier.watchdog_interval
        if interval is None:
            self._next_ping = float("inf")
            return
        now = self.clock()
        if now >= self._next_ping and self.healthy:
            self.notifier.watchdog()
            self._next_ping = now + interval

    def _finish(self, close_hooks: Callable[[], None]) -> None:
        """Each step of a stop runs even when one before it failed: above all the final
        state save, without which a restart reads everything again (FAULTS.md #63)."""
        self.notifier.stopping()
        try:
            steps: list[tuple[str, Callable[[], None]]] = [
                ("finish", lambda: self.engine.finish(scan_timeout=_SCAN_STOP_SECONDS)),
                ("retention", self._retain),
                ("state save", lambda: self._save(final=True)),
            ]
            for name, step in steps:
                try:
                    step()
                except Exception as exc:  # the rest of the stop still runs
                    self.errors += 1
                    self.log.error("Stop step failed", step=name,
                                   error=f"{type(exc).__name__}: {exc}")
        finally:
            self.watcher.stop()
            close_hooks()
            if self.tailer is not None:
                self.tailer.close()
            counts = {k: v for k, v in sorted(self.engine.counts.items())}
            self.log.info("Stopped", mode="run", errors=self.errors, **counts)
            self.notifier.close()
