"""Place one checkpoint's files into a snapshot's ``model/``: a reflink, else a hard
link, else a copy, and say for each file how it was placed and what it looked like.

Why each rule (FAULTS.md):
- a symlink inside the checkpoint (DeepSpeed's ``pytorch_model.bin ->
  global_step10/...``) is resolved to the file it names, and that file's content is kept
  under the link's name (#47): ``link(2)`` would link the symlink itself, which dangles
  once the trainer rotates the checkpoint away; a link that leaves the checkpoint is
  skipped for the same reason (#30);
- a copy keeps the source's mode (#46): a 0600 file stays 0600;
- a copy is written in chunks, checks ``cancel`` between them and is fsynced before the
  snapshot is published (#37): a stop abandons a multi-GB copy within a chunk;
- each placed file's size and mtime go into the manifest (#48): a hard link shares its
  inode with the trainer's file, so a re-save in place would change the snapshot; the
  manifest is what ``smart-monitor verify`` and the daemon compare against.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["Cancelled", "Placed", "Placer", "checkpoint_files", "reflink"]

Mode = Literal["auto", "hardlink", "copy"]
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_NO_REFLINK = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF, errno.EPERM}
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP}
_CHUNK = 16 << 20  # a stop waits at most one chunk of a copy


class Cancelled(Exception):
    """The copy was abandoned because ``cancel`` was set (a stop)."""


@dataclass(frozen=True, slots=True)
class Placed:
    """One file of ``model/``: how it got there and what it looked like then."""

    rel: str
    how: str  # "reflink", "hardlink" or "copy"
    size: int
    mtime_ns: int


def checkpoint_files(root: Path) -> Iterator[tuple[str, Path]]:
    """``(name in model/, real file)`` for every regular file of a checkpoint (a folder
    or a single file). Symlinks are resolved; one that leaves the checkpoint is skipped."""
    if not root.is_dir():
        yield root.name, root
        return
    top = root.resolve()
    for dirpath, _dirs, names in os.walk(root):
        for n in sorted(names):
            p = Path(dirpath) / n
            real = p.resolve() if p.is_symlink() else p
            if real is not p and not real.is_relative_to(top):
                continue
            if real.is_file():
                yield str(p.relative_to(root)), real


class Placer:
    """Remembers, per pair of devices, whether reflinks work, so a file system without
    them costs one failed ioctl per process, not one per file."""

    def __init__(self, mode: Mode) -> None:
        self.mode = mode
        self._reflinks: dict[tuple[int, int], bool] = {}

    def copies(self, src: Path, dest_dir: Path) -> bool:
        """Whether placing ``src`` under ``dest_dir`` is (most likely) a full copy: copy
        mode, or another file system, where neither a link nor a reflink can work."""
        if self.mode == "copy":
            return not self._reflinks.get((src.stat().st_dev, dest_dir.stat().st_dev), False)
        return src.stat().st_dev != dest_dir.stat().st_dev

    def place(self, rel: str, src: Path, target: Path, cancel: threading.Event | None) -> Placed:
        target.parent.mkdir(parents=True, exist_ok=True)
        st = src.stat()
        how = self._link_or_copy(src, st, target, cancel)
        got = target.stat()
        return Placed(rel, how, got.st_size, got.st_mtime_ns)

    def _link_or_copy(
        self, src: Path, st: os.stat_result, target: Path, cancel: threading.Event | None
    ) -> str:
        if self.mode != "hardlink":
            devs = (st.st_dev, target.parent.stat().st_dev)
            if self._reflinks.get(devs, True):
                ok = reflink(src, st, target)
                self._reflinks[devs] = ok
                if ok:
                    return "reflink"
        if self.mode != "copy":
            try:
                os.link(src, target)  # src is a real file: links are resolved above
                return "hardlink"
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
        _copy(src, st, target, cancel)
        return "copy"


def _create(target: Path, st: os.stat_result) -> int:
    """A new file with the source's permission bits, whatever the umask."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.fchmod(fd, st.st_mode & 0o7777)
    return fd


def reflink(src: Path, st: os.stat_result, target: Path) -> bool:
    try:
        with open(src, "rb") as s:
            out = _create(target, st)
            try:
                fcntl.ioctl(out, _FICLONE, s.fileno())
            finally:
                os.close(out)
        return True
    except OSError as exc:
        if exc.errno == errno.ENOENT and not src.exists():
            raise
        target.unlink(missing_ok=True)
        if exc.errno in _NO_REFLINK or exc.errno == errno.ENOENT:
            return False
        raise


def _copy(src: Path, st: os.stat_result, target: Path, cancel: threading.Event | None) -> None:
    """Chunk by chunk in the kernel (``sendfile``), fsynced; raises ``Cancelled``."""
    with open(src, "rb") as s:
        out = _create(target, st)
        try:
            offset = 0
            while True:
                if cancel is not None and cancel.is_set():
                    raise Cancelled(str(src))
                sent = os.sendfile(out, s.fileno(), offset, _CHUNK)
                if sent == 0:
                    break
                offset += sent
            os.fsync(out)
        finally:
            os.close(out)
