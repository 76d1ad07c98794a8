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
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smart_monitor.explain import explain
from smart_monitor.outputs.atomic import fsync_dir, write_atomic
from smart_monitor.outputs.manifest import MANIFEST, manifest_data
from smart_monitor.outputs.pin import Cancelled, Mode, Placed, Placer, checkpoint_files
from smart_monitor.sources.checkpoints import Checkpoint

if TYPE_CHECKING:
    from smart_monitor.outputs.retention import DiskBudget

__all__ = [
    "SnapshotError", "SnapshotResult", "SnapshotWriter", "json_safe", "pending_metadata",
    "update_pin", "write_metadata",
]

TMP_PREFIX = ".tmp-"
SNAPSHOT_PREFIX = "anomaly_"
# The temporaries this package makes: a snapshot being built (12 hex digits), one being
# deleted or released by retention (``del-``/``rel-`` and 8), the start-up link probe.
# Nothing else under ``snapshot_dir`` is ever removed (FAULTS.md #58: it may be /tmp).
_OWN_TMP = re.compile(r"^\.tmp-(?:[0-9a-f]{12}|(?:del|rel)-[0-9a-f]{8}|linkprobe-\d+)$")


def own_temporary(name: str) -> bool:
    """Whether ``name`` is one of our temporaries (``.tmp-build-cache`` is not)."""
    return _OWN_TMP.match(name) is not None


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
        # what pins are made with and why: decided at start, and said when it changes (#54)
        self.mode_in_use: tuple[str, str] = (mode, "configured")
        # where the snapshots stand against the disk budget, as the daemon's housekeeping
        # last found (``/metrics`` shows it: a scrape never walks 20k snapshots, #65)
        self.budget: DiskBudget | None = None
        # checkpoint -> (the model/ a copy of it went to, its files then): a second
        # snapshot of the unchanged checkpoint links those files, never copies twice (#57)
        self._copies: dict[Path, tuple[Path, list[Placed]]] = {}

    def remove_temporaries(self) -> list[Path]:
        """Delete what a crash mid-snapshot left behind (FAULTS.md #25): our own
        temporaries only, never a foreign ``.tmp-*`` (#58)."""
        if not self.root.is_dir():
            return []
        left = [p for p in self.root.iterdir() if own_temporary(p.name)]
        for p in left:
            shutil.rmtree(p, ignore_errors=True)
        return left

    def published(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """Every finished snapshot with its metadata, oldest name first: the
        ``anomaly_*`` folders whose ``metadata.json`` this writer made (it carries
        ``created_at``). Retention and the disk budget act on these alone, so a folder
        of someone else's in a shared ``snapshot_dir`` is never touched (#58)."""
        if not self.root.is_dir():
            return
        for p in sorted(self.root.iterdir()):
            if not p.name.startswith(SNAPSHOT_PREFIX) or not p.is_dir():
                continue
            try:
                meta = json.loads((p / "metadata.json").read_bytes())
            except (OSError, ValueError):
                continue
            if isinstance(meta, dict) and "created_at" in meta:
                yield p, meta

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
        tmp = self._temporary()
        try:
            mode, placed = None, list[Placed]()
            if checkpoint is not None:
                mode, placed = self._pin(checkpoint, tmp, cancel)
            meta = dict(metadata)
            meta["created_at"] = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
            meta["checkpoint"] = None if checkpoint is None else _block(checkpoint, mode, placed)
            if checkpoint is None:
                meta.setdefault("note", "no complete checkpoint existed at or before this step")
            final = self._publish(tmp, now, name, meta)
            fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._remember(checkpoint, final, placed)
        return SnapshotResult(final, mode, len(placed), sum(p.size for p in placed))

    def pin_into(
        self, folder: Path, checkpoint: Checkpoint, cancel: threading.Event | None = None
    ) -> SnapshotResult:
        """Give a published metadata-only snapshot its ``model/``: the pin that was
        still copying when the snapshot was published, or that failed and is retried
        (FAULTS.md #55, #57). ``model/`` and its manifest are built aside, then renamed
        in; ``metadata.json`` then gets its ``checkpoint`` block and loses the ``pin``
        note. Raises like ``write``; the folder is left as it was."""
        tmp = self._temporary()
        try:
            mode, placed = self._pin(checkpoint, tmp, cancel)
            meta = json.loads((folder / "metadata.json").read_bytes())
            pin = meta.pop("pin", None)
            if isinstance(pin, dict) and meta.get("note") == pin.get("note"):
                meta.pop("note", None)
            meta["checkpoint"] = _block(checkpoint, mode, placed)
            os.rename(tmp / MANIFEST, folder / MANIFEST)
            os.rename(tmp / "model", folder / "model")
            write_metadata(folder, meta)
        except FileNotFoundError as exc:
            if exc.filename is not None and Path(exc.filename).is_relative_to(folder):
                raise SnapshotError("snapshot_removed", str(folder)) from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._remember(checkpoint, folder, placed)
        return SnapshotResult(folder, mode, len(placed), sum(p.size for p in placed))

    def _temporary(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        return tmp

    def _remember(self, checkpoint: Checkpoint | None, folder: Path, placed: list[Placed]) -> None:
        if checkpoint is not None and any(p.how == "copy" for p in placed):
            self._copies[checkpoint.path] = (folder / "model", placed)

    def _publish(self, tmp: Path, now: datetime, name: str, meta: Mapping[str, Any]) -> Path:
        """Write the metadata, whose explanation names the final folder, then rename
        into place; a name taken meanwhile (a copy finishing on the copier) takes the
        next suffix."""
        while True:
            final = self._final_path(now, name)
            text = json.dumps(_explained(meta, final), indent=2) + "\n"
            _write_synced(tmp / "metadata.json", text)
            fsync_dir(tmp)
            try:
                os.rename(tmp, final)
                return final
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise

    def _final_path(self, now: datetime, name: str) -> Path:
        base = f"{SNAPSHOT_PREFIX}{now.strftime('%Y%m%d_%H%M%S')}_{name}"
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
        self, checkpoint: Checkpoint, tmp: Path, cancel: threading.Event | None
    ) -> tuple[str, list[Placed]]:
        """Link or copy every file of the checkpoint into ``tmp/model`` and write its
        manifest; raises SnapshotError when the source vanishes (rotation), the disk is
        full or ``cancel`` is set, leaving the caller to clean up."""
        dest = tmp / "model"
        placed: list[Placed] = []
        try:
            self._check_space(checkpoint)
            sources = list(checkpoint_files(checkpoint.path))
            if not sources and not checkpoint.path.exists():
                raise FileNotFoundError(checkpoint.path)
            shared = self._copied_before(checkpoint, sources)
            first: dict[Path, Placed] = {}  # a file named twice (a link and its target)
            for rel, src in sources:  # is placed once, then linked inside the snapshot
                if src in first:
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.link(dest / first[src].rel, dest / rel)
                    placed.append(Placed(rel, first[src].how, first[src].size,
                                         first[src].mtime_ns))
                elif rel in shared:  # the same bytes, copied for another snapshot
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.link(shared[rel][0], dest / rel)
                    placed.append(first.setdefault(src, shared[rel][1]))
                else:
                    placed.append(first.setdefault(
                        src, self.placer.place(rel, src, dest / rel, cancel)))
            _write_synced(tmp / MANIFEST, json.dumps(manifest_data(placed, dest), indent=1) + "\n")
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

    def _copied_before(
        self, checkpoint: Checkpoint, sources: list[tuple[str, Path]]
    ) -> dict[str, tuple[Path, Placed]]:
        """The files of an earlier copy of this checkpoint that are still as they were
        then (the same size, the source not modified since), by name in ``model/``."""
        model, placed = self._copies.get(checkpoint.path, (None, []))
        if model is None:
            return {}
        out: dict[str, tuple[Path, Placed]] = {}
        was = {p.rel: p for p in placed if p.how == "copy"}
        for rel, src in sources:
            p = was.get(rel)
            if p is None:
                continue
            try:
                st, kept = src.stat(), (model / rel).stat()
            except OSError:
                continue
            if st.st_size == p.size == kept.st_size and kept.st_mtime_ns == p.mtime_ns and (
                st.st_mtime_ns <= p.mtime_ns
            ):
                out[rel] = (model / rel, p)
        return out


def _block(checkpoint: Checkpoint, mode: str | None, placed: list[Placed]) -> dict[str, Any]:
    """``metadata.json``'s ``checkpoint``: what was pinned, and how."""
    return {
        "name": checkpoint.name,
        "step": checkpoint.step,
        "mode": mode,
        "path": str(checkpoint.path),
        "files": len(placed),
        "bytes": sum(p.size for p in placed),
    }


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def write_metadata(folder: Path, meta: Mapping[str, Any]) -> None:
    """Re-publish a snapshot's ``metadata.json`` (a release, a recovered incident), its
    explanation made again: a released snapshot has no weights left to roll back to."""
    text = json.dumps(_explained(meta, folder), indent=2) + "\n"
    write_atomic(folder / "metadata.json", text.encode())


def _explained(meta: Mapping[str, Any], folder: Path) -> Any:
    """The metadata, JSON-safe, with its ``explanation`` block (``explain.py``)."""
    safe = json_safe(meta)
    safe["explanation"] = explain(safe, str(folder.absolute())).to_dict()
    return safe


def pending_metadata(
    metadata: Mapping[str, Any], checkpoint: str | None, status: str, note: str
) -> dict[str, Any]:
    """Metadata for a snapshot whose ``model/`` is not in place yet: ``pin`` says which
    checkpoint and why (``copying``, or why it failed); ``pin_into`` removes it."""
    pin = {"checkpoint": checkpoint, "status": status, "note": note}
    return {**metadata, "pin": pin, "note": note}


def update_pin(folder: Path, status: str | None, note: str) -> None:
    """Say in a pending snapshot's metadata why its pin is not in yet (``status``), or
    (None) that none will come; raises OSError/ValueError when it cannot be read."""
    meta = json.loads((folder / "metadata.json").read_bytes())
    pin = meta.pop("pin", None)
    if status is not None and isinstance(pin, dict):
        meta["pin"] = {**pin, "status": status, "note": note}
    write_metadata(folder, {**meta, "note": note})


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
