"""Start-up checks (FAULTS.md #34, #35, #49): find at start what would otherwise be
found only when a snapshot fails, or never.

``check_paths`` is the one path validation that both ``check-config`` and ``run`` apply:
each output folder must exist or be creatable, and be writable, which is tried for real
(a probe folder made and removed in the nearest existing ancestor: ``os.access`` says
yes to root everywhere, and nothing but a real ``mkdir`` knows about ``/proc`` or a read-only
mount); the checkpoint folder, when it exists, must be listable. It leaves nothing behind.

``check_links`` says whether snapshots can link the trainer's files (``links.py``):
under ``fs.protected_hardlinks`` a user may not link another user's file it cannot
write, and no one may link across file systems: every snapshot would then be a full
copy of the checkpoint, which is what fills a disk. Said once at start with the fix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from smart_monitor.config import Config, ConfigError
from smart_monitor.outputs.snapshot import TMP_PREFIX
from smart_monitor.runtime.links import decide_links

__all__ = ["check_links", "check_paths"]

_OUTPUTS = ("state_dir", "snapshot_dir", "log_dir")


def _probe_writable(key: str, folder: Path) -> None:
    """Raise ConfigError unless ``folder`` is, or can be made, a writable folder."""
    here = folder.absolute()
    ancestor = here
    while not ancestor.exists():
        if ancestor.is_symlink():  # a dangling link: mkdir would fail on it
            raise ConfigError(f"{key}: {ancestor} is a dangling symlink")
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        what = "is a file" if ancestor == here else f"is under a file ({ancestor})"
        raise ConfigError(f"{key}: {here} {what}, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}probe-", dir=ancestor)
        os.rmdir(probe)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"{key}: {here} is not writable ({ancestor}: {reason})") from None


def _check_readable(path: Path) -> None:
    """Raise ConfigError when the metrics file (or folder), or a folder above it, may
    not be read: a run folder at 0700 (FAULTS.md #53). Missing is fine: it is awaited."""
    try:
        if path.is_dir():
            os.listdir(path)
        elif path.exists():
            with open(path, "rb"):
                pass
    except OSError as exc:
        raise ConfigError(
            f"metrics_file: {path} cannot be read ({os.strerror(exc.errno or 0)})"
        ) from None


def check_paths(config: Config) -> None:
    """Every problem here is a config error: one line naming the key (exit 2)."""
    for key in _OUTPUTS:
        _probe_writable(key, getattr(config, key))
    if config.metrics_file is not None:
        _check_readable(config.metrics_file)
    ck = config.checkpoint_dir
    if ck is not None and ck.exists():
        if not ck.is_dir():
            raise ConfigError(f"checkpoint_dir: {ck} is not a folder")
        try:
            os.listdir(ck)
        except OSError as exc:
            raise ConfigError(
                f"checkpoint_dir: {ck} cannot be listed ({os.strerror(exc.errno or 0)})"
            ) from None


def check_links(config: Config) -> str | None:
    """None when snapshots can share the trainer's blocks (reflink or hard link); else
    one line saying why not and what to change (``links.decide_links``)."""
    return decide_links(config).problem
