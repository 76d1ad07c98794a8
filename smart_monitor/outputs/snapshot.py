"""Build, pin and publish snapshots: ``snapshot_dir/anomaly_<UTC time>_<trigger>/``.

A snapshot is built under ``.tmp-*`` in the snapshot directory (same file system, so
the final ``rename`` is atomic), its files synced, then renamed into place: a reader
never sees a half-made snapshot, and a crash leaves only a ``.tmp-*`` that the next
start removes. ``model/`` is made file by file with a reflink, else a hard link, else a
copy, so a multi-GB checkpoint on one file system is pinned in milliseconds and
survives the trainer's rotation deleting its source.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from smart_monitor.sources.checkpoints import Checkpoint

__all__ = ["SnapshotError", "SnapshotResult", "SnapshotWriter", "json_safe", "write_metadata"]

Mode = Literal["auto", "hardlink", "copy"]
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_NO_REFLINK = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.EBADF, errno.EPERM}
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EACCES, errno.ENOTSUP}
TMP_PREFIX = ".tmp-"


class SnapshotError(Exception):
    """A snapshot that could not be made; ``reason`` is a short greppable token."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class SnapshotResult:
    path: Path
    mode: str | None
    files: int
    bytes: int


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SnapshotWriter:
    def __init__(
        self, root: Path, mode: Mode = "auto", clock: Callable[[], datetime] = _utc_now
    ) -> None:
        self.root = root
        self.mode = mode
        self.clock = clock
        self._reflinks: dict[tuple[int, int], bool] = {}  # (src dev, dest dev) -> works

    def remove_temporaries(self) -> list[Path]:
        """Delete what a crash mid-snapshot left behind (FAULTS.md #25)."""
        if not self.root.is_dir():
            return []
        left = [p for p in self.root.iterdir() if p.name.startswith(TMP_PREFIX)]
        for p in left:
            shutil.rmtree(p, ignore_errors=True)
        return left

    def published(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Every finished snapshot with its metadata, oldest name first."""
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if p.name.startswith(TMP_PREFIX) or not p.is_dir():
                continue
            try:
                yield p, json.loads((p / "metadata.json").read_bytes())
            except (OSError, ValueError):
                continue

    def write(
        self, name: str, metadata: Mapping[str, Any], checkpoint: Checkpoint | None
    ) -> SnapshotResult:
        now = self.clock()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            mode, files, size = None, 0, 0
            if checkpoint is not None:
                self._check_space(checkpoint)
                mode, files, size = self._pin(checkpoint, tmp / "model")
            meta = dict(metadata)
            meta["created_at"] = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            meta["checkpoint"] = (
                None
                if checkpoint is None
                else {
                    "name": checkpoint.name,
                    "step": checkpoint.step,
                    "mode": mode,
                    "path": str(checkpoint.path),
                    "files": files,
                    "bytes": size,
                }
            )
            if checkpoint is None:
                meta.setdefault("note", "no complete checkpoint existed at or before this step")
            _write_synced(tmp / "metadata.json", json.dumps(json_safe(meta), indent=2) + "\n")
            _fsync_dir(tmp)
            final = self._final_path(now, name)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            return SnapshotResult(final, mode, files, size)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _final_path(self, now: datetime, name: str) -> Path:
        base = f"anomaly_{now.strftime('%Y%m%d_%H%M%S')}_{name}"
        path, n = self.root / base, 1
        while path.exists():  # rename onto an empty dir would succeed silently
            n += 1
            path = self.root / f"{base}_{n}"
        return path

    def _check_space(self, checkpoint: Checkpoint) -> None:
        if self.mode != "copy":
            return
        need = sum(f.stat().st_size for f in _files(checkpoint.path))
        free = shutil.disk_usage(self.root).free
        if free < need * 1.1:
            raise SnapshotError("no_space", f"need {need} bytes, {free} free")

    def _pin(self, checkpoint: Checkpoint, dest: Path) -> tuple[str, int, int]:
        """Link or copy every file of the checkpoint; raises SnapshotError when the
        source vanishes (rotation) or the disk is full, leaving the caller to clean up."""
        used: set[str] = set()
        files = size = 0
        src_root = checkpoint.path
        try:
            sources = [src_root] if src_root.is_file() else list(_files(src_root))
            if not sources and not src_root.exists():
                raise FileNotFoundError(src_root)
            for src in sources:
                rel = src.name if src_root.is_file() else src.relative_to(src_root)
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                used.add(self._place(src, target))
                files += 1
                size += target.stat().st_size
        except FileNotFoundError as exc:
            raise SnapshotError("source_vanished", str(exc.filename or exc)) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SnapshotError("no_space", str(exc)) from None
            raise SnapshotError("io_error", str(exc)) from None
        order = ("copy", "hardlink", "reflink")
        mode = next((m for m in order if m in used), "reflink")
        return mode, files, size

    def _place(self, src: Path, target: Path) -> str:
        if self.mode != "hardlink":
            devs = (src.stat().st_dev, target.parent.stat().st_dev)
            if self._reflinks.get(devs, True):
                ok = _reflink(src, target)
                self._reflinks[devs] = ok
                if ok:
                    return "reflink"
        if self.mode != "copy":
            try:
                os.link(src, target, follow_symlinks=True)
                return "hardlink"
            except OSError as exc:
                if exc.errno not in _NO_LINK:
                    raise
        shutil.copyfile(src, target)
        return "copy"


def _files(root: Path) -> Iterator[Path]:
    """Regular files under ``root``; links are followed only when they stay inside it,
    since a link that escapes would dangle once the trainer rotates its target."""
    top = root.resolve()
    for dirpath, _dirs, names in os.walk(root):
        for n in sorted(names):
            p = Path(dirpath) / n
            if p.is_symlink() and not p.resolve().is_relative_to(top):
                continue
            if p.is_file():
                yield p


def _reflink(src: Path, target: Path) -> bool:
    try:
        with open(src, "rb") as s, open(target, "wb") as t:
            fcntl.ioctl(t.fileno(), _FICLONE, s.fileno())
        return True
    except OSError as exc:
        if exc.errno == errno.ENOENT and not src.exists():
            raise
        target.unlink(missing_ok=True)
        if exc.errno in _NO_REFLINK or exc.errno == errno.ENOENT:
            return False
        raise


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_metadata(folder: Path, meta: Mapping[str, Any]) -> None:
    """Re-publish a snapshot's ``metadata.json``: a temporary, synced, renamed."""
    tmp = folder / ".metadata.json.tmp"
    _write_synced(tmp, json.dumps(json_safe(meta), indent=2) + "\n")
    os.replace(tmp, folder / "metadata.json")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def json_safe(value: Any) -> Any:
    """Non-finite floats as the strings ``"NaN"``/``"Infinity"`` so that ``jq`` reads
    the file (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
