"""Build, pin and publish snapshots: ``snapshot_dir/anomaly_<UTC time>_<trigger>/``.

A snapshot is built under ``.tmp-*`` in the snapshot directory (same file system, so
the final ``rename`` is atomic), its files synced, then renamed into place: a reader
never sees a half-made snapshot, and a crash leaves only a ``.tmp-*`` that the next
start removes. ``model/`` is made file by file with a reflink, else a hard link, else a
copy (``pin.py``), so a multi-GB checkpoint on one file system is pinned in
milliseconds and survives the trainer's rotation deleting its source; ``manifest.json``
records what was pinned, so that a re-save through a hard link is found
(``manifest.py``). A copy can take minutes: the daemon runs it off its worker
(``copier.py``), and a stop cancels it.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smart_monitor.outputs.atomic import fsync_dir, write_atomic
from smart_monitor.outputs.manifest import MANIFEST, manifest_data
from smart_monitor.outputs.pin import Cancelled, Mode, Placed, Placer, checkpoint_files
from smart_monitor.sources.checkpoints import Checkpoint

__all__ = ["SnapshotError", "SnapshotResult", "SnapshotWriter", "json_safe", "write_metadata"]

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
        self.placer = Placer(mode)

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
        self,
        name: str,
        metadata: Mapping[str, Any],
        checkpoint: Checkpoint | None,
        cancel: threading.Event | None = None,
    ) -> SnapshotResult:
        """Build, sync and publish one snapshot. ``cancel`` (set by a stop) abandons a
        copy between two chunks: the temporary is removed, ``SnapshotError("cancelled")``."""
        now = self.clock()
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            mode, placed = None, list[Placed]()
            if checkpoint is not None:
                self._check_space(checkpoint)
                mode, placed = self._pin(checkpoint, tmp / "model", cancel)
                manifest = manifest_data(placed, tmp / "model")
                _write_synced(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")
            files, size = len(placed), sum(p.size for p in placed)
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
            fsync_dir(tmp)
            final = self._final_path(now, name)
            os.rename(tmp, final)
            fsync_dir(self.root)
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

    def copies(self, checkpoint: Checkpoint) -> bool:
        """Whether pinning ``checkpoint`` means copying its bytes (seconds to minutes),
        which the daemon then does off its worker; links and reflinks take milliseconds."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return self.placer.copies(checkpoint.path, self.root)
        except OSError:
            return False  # vanished: the write finds out, and says so

    def _check_space(self, checkpoint: Checkpoint) -> None:
        if self.mode != "copy":
            return
        need = sum(f.stat().st_size for _, f in checkpoint_files(checkpoint.path))
        free = shutil.disk_usage(self.root).free
        if free < need * 1.1:
            raise SnapshotError("no_space", f"need {need} bytes, {free} free")

    def _pin(
        self, checkpoint: Checkpoint, dest: Path, cancel: threading.Event | None
    ) -> tuple[str, list[Placed]]:
        """Link or copy every file of the checkpoint; raises SnapshotError when the
        source vanishes (rotation), the disk is full or ``cancel`` is set, leaving the
        caller to clean up."""
        placed: list[Placed] = []
        try:
            sources = list(checkpoint_files(checkpoint.path))
            if not sources and not checkpoint.path.exists():
                raise FileNotFoundError(checkpoint.path)
            first: dict[Path, Placed] = {}  # a file named twice (a link and its target)
            for rel, src in sources:  # is placed once, then linked inside the snapshot
                if src in first:
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.link(dest / first[src].rel, dest / rel)
                    placed.append(Placed(rel, first[src].how, first[src].size,
                                         first[src].mtime_ns))
                else:
                    placed.append(first.setdefault(
                        src, self.placer.place(rel, src, dest / rel, cancel)))
        except Cancelled as exc:
            raise SnapshotError("cancelled", f"stopped while copying {exc}") from None
        except FileNotFoundError as exc:
            raise SnapshotError("source_vanished", str(exc.filename or exc)) from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SnapshotError("no_space", str(exc)) from None
            raise SnapshotError("io_error", str(exc)) from None
        used = {p.how for p in placed}
        mode = next((m for m in ("copy", "hardlink", "reflink") if m in used), "reflink")
        return mode, placed


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_metadata(folder: Path, meta: Mapping[str, Any]) -> None:
    """Re-publish a snapshot's ``metadata.json`` (a release, a recovered incident)."""
    write_atomic(folder / "metadata.json", (json.dumps(json_safe(meta), indent=2) + "\n").encode())


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
