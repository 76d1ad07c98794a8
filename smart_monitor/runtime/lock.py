"""One instance per output folder (FAULTS.md #36): an ``flock`` on the folder itself.

Two monitors writing one snapshot folder double every snapshot, and the second one's
start-up removes the first one's snapshot in progress (a ``.tmp-*``). So ``run`` locks
its state folder and its snapshot folder, and ``replay`` its snapshot folder, before
anything else touches them. The lock is taken on the folder's own file descriptor, so
no lock file sits among the snapshots; a second instance finds it held and reads the
holder's PID from ``/proc/locks``. ``flock`` dies with its process, so a SIGKILLed
holder leaves no stale lock behind (a PID file would).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

__all__ = ["FolderLock", "LockHeld", "lock_folders"]

_PROC_LOCKS = Path("/proc/locks")


class LockHeld(Exception):
    """Another live process holds the lock: one line naming the folder and its PID."""


def holder_pid(folder: Path, proc_locks: Path = _PROC_LOCKS) -> str:
    """The PID holding an flock on ``folder``, from ``/proc/locks``; ``unknown`` when
    it cannot be read (``1: FLOCK ADVISORY WRITE 4242 fd:01:1234 0 EOF``)."""
    st = os.stat(folder)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    try:
        text = proc_locks.read_text()
    except OSError:
        return "unknown"
    for row in text.splitlines():
        fields = row.split()
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        try:
            major, minor, inode = fields[5].split(":")
            if (int(major, 16), int(minor, 16), int(inode)) == want:
                return fields[4]
        except ValueError:
            continue
    return "unknown"


class FolderLock:
    """Held from ``acquire()`` to ``release()`` (or the process's end)."""

    def __init__(self, folder: Path, key: str) -> None:
        self.folder = folder
        self.key = key
        self._fd: int | None = None

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            raise LockHeld(
                f"{self.key}: {self.folder} is in use by another smart-monitor "
                f"(pid {holder_pid(self.folder)})"
            ) from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
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
