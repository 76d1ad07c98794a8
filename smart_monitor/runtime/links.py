"""How snapshots will hold the trainer's files, decided the same way at every start
(FAULTS.md #35, #54).

A hard link (or a reflink) pins a multi-GB checkpoint in milliseconds and costs no
space until the trainer rotates it away; a copy costs its full size. Under
``fs.protected_hardlinks`` (the default on every current distribution) a user may
hard-link another user's file only when it may also write it, so a monitor that runs
as a service user in the trainer's group links only files the trainer made
group-writable (umask 002, or a default ACL): with the usual umask 022 every snapshot
would be a full copy.

So at start one file of the trainer's is tried for real (a link into the snapshot
folder, removed at once). When the checkpoint folder holds no file yet (the first
start of a service, before the trainer), the answer is read from the folder the
trainer made: another user's folder that this user may not write was made with a
umask that keeps the group from writing the files to come as well. A first start and
a restart then reach the same verdict, where the old trial alone let the first start
copy every checkpoint in silence and then refused every restart. The verdict is the
``Snapshot mode`` line at start and ``smart_monitor_snapshot_mode_info`` in
``/metrics``.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from smart_monitor.config import Config
from smart_monitor.outputs.pin import reflink
from smart_monitor.outputs.snapshot import TMP_PREFIX

__all__ = ["LinkMode", "decide_links"]

_PROTECTED = Path("/proc/sys/fs/protected_hardlinks")
_FIX = (
    "every snapshot would be a full copy. Run the monitor as the trainer's user or group "
    "(in its group, the trainer's files group-writable: umask 002 or a default ACL, see "
    "docs/operations.md), put snapshot_dir on the trainer's file system (a reflink one: "
    'XFS, btrfs), or set snapshot.mode = "copy" to accept full copies'
)


@dataclass(frozen=True, slots=True)
class LinkMode:
    """``mode``: ``reflink``, ``hardlink`` or ``copy``; ``why``: what decided it;
    ``problem``: the one line to exit 2 with, when links were wanted and cannot work."""

    mode: str
    why: str
    problem: str | None = None


def decide_links(config: Config) -> LinkMode:
    """The snapshot folder must exist (``check_paths`` and the lock made it)."""
    if config.snapshot.mode == "copy":
        return LinkMode("copy", 'snapshot.mode = "copy"')
    src = _trainer_file(config)
    if src is not None:
        return _trial(src, config.snapshot_dir)
    folder = config.checkpoint_dir
    if folder is None or not folder.is_dir():
        return LinkMode("hardlink", "nothing to pin from yet: tried at the next start")
    return _from_folder(folder, config.snapshot_dir)


def _trainer_file(config: Config) -> Path | None:
    """A file the trainer wrote in its checkpoint folder (the metrics file often lives
    there); None without a checkpoint folder: then nothing is ever pinned."""
    ck = config.checkpoint_dir
    if ck is None or not ck.is_dir():
        return None
    for dirpath, _dirs, names in os.walk(ck):
        for n in sorted(names):
            p = Path(dirpath) / n
            if p.is_file() and not p.is_symlink():
                return p
    return None


def _trial(src: Path, snap: Path) -> LinkMode:
    target = snap / f"{TMP_PREFIX}linkprobe-{os.getpid()}"
    try:
        if reflink(src, src.stat(), target):
            return LinkMode("reflink", f"a trial reflink of {src} worked")
        os.link(src, target)
        return LinkMode("hardlink", f"a trial link of {src} worked")
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            why = f"{snap} and {src.parent} are on different file systems"
        elif exc.errno in (errno.EPERM, errno.EACCES):
            st = src.stat()
            why = (
                f"this user (uid {os.getuid()}) may not hard-link {src} (owner uid "
                f"{st.st_uid} gid {st.st_gid}, mode {st.st_mode & 0o777:o}; "
                "fs.protected_hardlinks)"
            )
        else:
            why = f"link {src} -> {snap}: {os.strerror(exc.errno or 0)}"
        return _refused(why)
    finally:
        target.unlink(missing_ok=True)


def _from_folder(folder: Path, snap: Path) -> LinkMode:
    """The verdict for files not written yet, from the folder that will hold them."""
    st = folder.stat()
    if st.st_dev != snap.stat().st_dev:
        return _refused(f"{snap} and {folder} are on different file systems")
    if os.geteuid() in (0, st.st_uid) or not _protected():
        return LinkMode("hardlink", f"this user may link the files of {folder}")
    if not os.access(folder, os.W_OK):
        return _refused(
            f"this user (uid {os.getuid()}) may not write {folder} (owner uid {st.st_uid} "
            f"gid {st.st_gid}, mode {st.st_mode & 0o777:o}), so neither the files the "
            "trainer will write there (fs.protected_hardlinks)"
        )
    return LinkMode("hardlink", f"{folder} is group-writable: so will the trainer's files be")


def _refused(why: str) -> LinkMode:
    problem = f"snapshot.mode: cannot hard-link checkpoints into snapshot_dir: {why}; {_FIX}"
    return LinkMode("copy", why, problem)


def _protected() -> bool:
    try:
        return _PROTECTED.read_text().strip() != "0"
    except OSError:
        return True  # unknown: assume the distribution default
