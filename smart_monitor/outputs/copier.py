"""Snapshots that copy their checkpoint, made on a thread of their own (FAULTS.md #37).

A hard link or a reflink pins a checkpoint in milliseconds and stays on the worker. A
copy (``snapshot.mode = "copy"``, or another file system) of a multi-GB checkpoint takes
minutes: on the worker it would stop the watchdog pings (systemd's ``WatchdogSec``
would kill the daemon, which would retry the same copy on restart) and detection. So
the worker publishes the snapshot with its metadata alone (the actions run then, never
behind a copy: #57), ``submit``s its ``model/`` here and goes on; the copy is built
under ``.tmp-*`` and renamed into the snapshot by the writer (``pin_into``), and the
worker ``collect``s the outcome on a later turn (``on_done`` wakes it) to log it.
``close`` at stop lets a nearly finished copy end, then cancels the rest between two
chunks: their temporaries are removed and they come back as ``cancelled``.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smart_monitor.outputs.snapshot import SnapshotError, SnapshotResult, SnapshotWriter
from smart_monitor.sources.checkpoints import Checkpoint

__all__ = ["Copier", "CopyDone", "CopyJob"]


@dataclass(frozen=True, slots=True)
class CopyJob:
    """One snapshot to write, or (``folder``) the ``model/`` of one already published
    with its metadata alone; ``context`` is the caller's, handed back untouched."""

    key: str
    name: str
    metadata: Mapping[str, Any]
    checkpoint: Checkpoint
    context: Any = field(default=None, compare=False)
    folder: Path | None = None


@dataclass(frozen=True, slots=True)
class CopyDone:
    job: CopyJob
    result: SnapshotResult | None
    error: SnapshotError | None


class Copier:
    """One thread, started on the first job, writing snapshots in the order submitted."""

    def __init__(self, writer: SnapshotWriter, on_done: Callable[[], None]) -> None:
        self.writer = writer
        self.on_done = on_done
        self._jobs: queue.SimpleQueue[CopyJob | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[CopyDone] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._held: dict[str, CopyJob] = {}  # submitted, not collected yet (worker thread only)
        self._thread: threading.Thread | None = None

    def submit(self, job: CopyJob) -> None:
        self._held[job.key] = job
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="smart-monitor-copy",
                                            daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def holds(self, key: str) -> bool:
        """A snapshot under this key is being copied (or is done, not collected yet)."""
        return key in self._held

    @property
    def busy(self) -> bool:
        return bool(self._held)

    def collect(self) -> list[CopyDone]:
        """The copies finished since the last call, never waiting."""
        out: list[CopyDone] = []
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                return out
            self._held.pop(done.job.key, None)
            out.append(done)

    def close(self, grace: float) -> list[CopyDone]:
        """Wait up to ``grace`` seconds for the copies to end, cancel what is left and
        return every outcome not collected yet. Bounded: a cancelled copy stops within
        one chunk; one stuck in a system call (a hung NFS server) is given up after
        another ``grace``, reported as cancelled, and its ``.tmp-*`` removed at the
        next start."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(grace)
            self._cancel.set()
            self._thread.join(grace)
            self._thread = None
        done = self.collect()
        stuck = SnapshotError("cancelled", "still copying when the stop gave up on it")
        done += [CopyDone(job, None, stuck) for job in self._held.values()]
        self._held.clear()
        return done

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._cancel.is_set():
                    raise SnapshotError("cancelled", "stopped before the copy began")
                if job.folder is not None:
                    result = self.writer.pin_into(job.folder, job.checkpoint, self._cancel)
                else:
                    result = self.writer.write(job.name, job.metadata, job.checkpoint,
                                               self._cancel)
                done = CopyDone(job, result, None)
            except SnapshotError as exc:
                done = CopyDone(job, None, exc)
            except Exception as exc:  # OSError or a bug: the worker logs it, we go on
                done = CopyDone(job, None, SnapshotError("io_error", repr(exc)))
            self._done.put(done)
            self.on_done()
