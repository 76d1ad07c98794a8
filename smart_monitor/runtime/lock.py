"""One instance per output folder (FAULTS.md #36): an ``flock`` on a lock file.

Two monitors writing one snapshot folder double every snapshot, and the second one's
start-up removes the first one's snapshot in progress (a ``.tmp-*``). So ``run`` locks
its state folder and its snapshot folder, and ``replay`` its snapshot folder, before
anything else touches them; a second instance finds the lock held and names the
holder's PID from the file. ``flock`` dies with its process, so a SIGKILLed holder
leaves no stale lock behind (a PID file alone would).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderLock", "LockHeld", "lock_folders"]

LOCK_NAME = ".smart_monitor.lock"


class LockHeld(Exception):
    """Another live process holds the lock: one line naming it and its PID."""


class FolderLock:
    """Held from ``acquire()`` to ``release()`` (or the process's end)."""

    def __init__(self, folder: Path, key: str) -> None:
        self.path = folder / LOCK_NAME
        self.key = key
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise LockHeld(
                f"{self.key}: {self.path.parent} is in use by another smart-monitor "
                f"(pid {holder}, lock {self.path})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (no unlink race)
            self._fd = None


def lock_folders(folders: dict[str, Path]) -> list[FolderLock]:
    """Lock each ``key -> folder`` (the same folder once); on a held lock release
    what was taken and raise ``LockHeld``."""
    held: list[FolderLock] = []
    seen: set[Path] = set()
    try:
        for key, folder in folders.items():
            real = folder.resolve()
            if real in seen:
                continue
            seen.add(real)
            lock = FolderLock(folder, key)
            lock.acquire()
            held.append(lock)
    except BaseException:
        for lock in held:
            lock.release()
        raise
    return held
