"""Wake the worker when the metrics file or the checkpoint folder changes.

``inotify``: a watchdog observer whose handler only posts a wake-up (FAULTS.md #29: an
exception in an observer thread kills it silently); the worker does all the reading.
The kernel delivers an event in about half a millisecond.

``polling``: no thread at all. The worker itself wakes every ``poll_interval``, stats
the metrics file and lists the checkpoint folder, as Fluent Bit's stat backend does.
That is what NFS, Lustre and CIFS need, since a write from another node raises no
inotify event (#30), and what ``auto`` falls back to when inotify is unavailable or its
watch or instance limits are exhausted (#19). (watchdog's ``PollingObserver`` rebuilds
a Python snapshot of the whole tree every interval, several times the idle CPU of a
stat and a ``scandir``, and its emitter stops for good when its root is deleted.)

Events are hints, never the record of truth: the worker reconciles by a full read and
scan every ``reconcile_seconds`` (#20). ``check()`` is the supervisor the worker calls
on every turn: it re-schedules the observer when a watched folder appeared, was
deleted or was recreated (#1, #28: the emitter stops after its root is deleted), and
restarts an observer whose thread died.
"""

from __future__ import annotations

import errno
import os
import queue
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

__all__ = ["Wakeups", "Watcher"]

Backend = Literal["auto", "inotify", "polling"]
ObserverFactory = Callable[[], BaseObserver]
_LIMIT_ERRNOS = {errno.ENOSPC, errno.EMFILE, errno.ENFILE}
# Changes only: a reader opening a file (our own snapshot copy, the trainer's resume)
# is no reason to wake the worker.
_CHANGES = [
    FileCreatedEvent, FileModifiedEvent, FileMovedEvent, FileDeletedEvent, FileClosedEvent,
    DirCreatedEvent, DirMovedEvent, DirDeletedEvent,
]
SYSCTL_HINT = "raise fs.inotify.max_user_watches / max_user_instances (sysctl), or use polling"


class Wakeups:
    """What changed since the worker last looked, as a set of kinds: a burst of events
    for one file is one wake-up. ``post`` is safe from a signal handler: a
    ``SimpleQueue.put`` takes no lock that the waiting worker could hold."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()

    def post(self, kind: str) -> None:
        self._queue.put(kind)

    def take(self, timeout: float) -> set[str]:
        try:
            kinds = {self._queue.get(timeout=max(0.0, timeout))}
        except queue.Empty:
            return set()
        while True:
            try:
                kinds.add(self._queue.get_nowait())
            except queue.Empty:
                return kinds


def make_observer() -> BaseObserver:
    from watchdog.observers.inotify import InotifyObserver  # ImportError off Linux

    return InotifyObserver()


@dataclass(frozen=True, slots=True)
class _Target:
    """A folder to watch: the nearest existing ancestor of what we want, and its inode
    (a changed inode means the folder was deleted and recreated)."""

    want: Path
    path: Path
    ino: int
    recursive: bool


class _Handler(FileSystemEventHandler):
    def __init__(self, route: Callable[[str], str | None], wakeups: Wakeups) -> None:
        self.route = route
        self.wakeups = wakeups

    def on_any_event(self, event: FileSystemEvent) -> None:
        for p in (event.src_path, getattr(event, "dest_path", "")):
            if p:
                kind = self.route(os.fsdecode(p))
                if kind is not None:
                    self.wakeups.post(kind)


class Watcher:
    """Watches ``metrics_file``'s folder and ``checkpoint_dir`` (recursively: a
    checkpoint is complete when a file inside it appears)."""

    def __init__(
        self,
        metrics_file: Path | None,
        checkpoint_dir: Path | None,
        backend: Backend,
        wakeups: Wakeups,
        log: Any,
        factory: ObserverFactory = make_observer,
    ) -> None:
        self.metrics_file = metrics_file.absolute() if metrics_file else None
        self.checkpoint_dir = checkpoint_dir.absolute() if checkpoint_dir else None
        self.backend = backend
        self.wakeups = wakeups
        self.log = log
        self.factory = factory
        self.kind = "polling" if backend == "polling" else "inotify"
        self.degraded = False
        self.restarts = 0
        self._observer: BaseObserver | None = None
        self._targets: tuple[_Target, ...] = ()

    # -- routing --------------------------------------------------------------------
    def _route(self, path: str) -> str | None:
        p = Path(path)
        metrics = self.metrics_file
        if metrics is not None and (p == metrics or _metrics_below(p, metrics)):
            return "metrics"
        if self.checkpoint_dir is not None and p.is_relative_to(self.checkpoint_dir):
            return "checkpoints"
        if any(t.path != t.want and t.want.is_relative_to(p) for t in self._targets):
            return "rescan"  # a missing folder on the way to what we want appeared
        return None

    def _wanted(self) -> tuple[_Target, ...]:
        wants: list[tuple[Path, bool]] = []
        if self.checkpoint_dir is not None:
            wants.append((self.checkpoint_dir, True))
        if self.metrics_file is not None:
            folder = self.metrics_file.is_dir()  # of TensorBoard or CSV files: below it
            parent = self.metrics_file if folder else self.metrics_file.parent
            ck = self.checkpoint_dir
            if ck is None or not parent.is_relative_to(ck):
                wants.append((parent, folder))
        out = []
        for want, recursive in wants:
            path = _nearest_existing(want)
            try:
                ino = path.stat().st_ino
            except OSError:
                continue
            out.append(_Target(want, path, ino, recursive and path == want))
        return tuple(out)

    # -- life cycle -----------------------------------------------------------------
    def start(self) -> None:
        """Start the inotify observer, or fall back to polling (the worker's own)."""
        self._targets = self._wanted()
        if self.kind == "polling":
            return
        try:
            self._observer = self._start(self._targets)
        except OSError as exc:
            if exc.errno not in _LIMIT_ERRNOS | {errno.ENOSYS}:
                raise
            self.log.warning(
                "Inotify unavailable, polling instead", error=str(exc), hint=SYSCTL_HINT,
                backend=self.backend,
            )
            self.kind = "polling"
            self.degraded = self.backend == "inotify" or exc.errno != errno.ENOSYS
        except ImportError:  # no inotify on this platform
            self.kind = "polling"

    def _start(self, targets: Iterable[_Target]) -> BaseObserver:
        observer = self.factory()
        handler = _Handler(self._route, self.wakeups)
        try:
            for t in targets:
                observer.schedule(
                    handler, str(t.path), recursive=t.recursive, event_filter=_CHANGES
                )
            observer.start()
        except BaseException:
            _stop(observer)
            raise
        return observer

    def stop(self) -> None:
        if self._observer is not None:
            _stop(self._observer)
            self._observer = None

    @property
    def healthy(self) -> bool:
        if self.kind == "polling":
            return True  # the worker polls: nothing else can die
        obs = self._observer
        return obs is not None and obs.is_alive() and all(e.is_alive() for e in obs.emitters)

    def check(self) -> bool:
        """Re-schedule when a watched folder appeared or was recreated, restart a dead
        observer; True when it did (the worker then rescans everything)."""
        if self.kind == "polling":
            return False
        wanted = self._wanted()
        if wanted == self._targets and self.healthy:
            return False
        if wanted == self._targets:
            self.restarts += 1
            self.log.error("Observer died, restarting it", restarts=self.restarts)
        else:
            self.log.info("Watching", paths=[str(t.path) for t in wanted])
        self.stop()
        self.start()
        return True


def _metrics_below(path: Path, folder: Path) -> bool:
    """A TensorBoard or CSV metrics file below a metrics folder; other files there,
    such as the checkpoints of a trainer whose output folder it is, are not metrics."""
    name = path.name
    if not (name.startswith("events.out.tfevents.") or name == "metrics.csv"):
        return False
    return path.is_relative_to(folder)


def _nearest_existing(path: Path) -> Path:
    while not path.is_dir() and path.parent != path:
        path = path.parent
    return path


def _stop(observer: BaseObserver) -> None:
    observer.stop()
    if observer.is_alive():
        observer.join(timeout=2)
