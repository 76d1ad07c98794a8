"""``manifest.json``: what each file of a snapshot's ``model/`` looked like when it was
pinned, so that a change is never silent (FAULTS.md #23, #48).

A hard link pins the trainer's inode in milliseconds and survives its rotation, but it
shares the bytes: a trainer that re-saves the same checkpoint in place (``r+b``, or
``torch.save`` onto an existing path without a rename) changes the snapshot too. Copying
every checkpoint would cost its full size in I/O and disk at every anomaly, which the
disk budget cannot afford on a multi-GB run; so the snapshot keeps the links and this
manifest of sizes and modification times (nanoseconds), which any write changes.
``smart-monitor verify SNAPSHOT`` compares them (exit 1 on a change) and the daemon does
the same for its hard-linked snapshots at every reconciliation, logging ``Snapshot
changed`` once per snapshot. Reflinked and copied files are checked the same way, for
free. Checking is ``stat`` only: milliseconds for a checkpoint of any size.

A writer can put the mtime back (``touch -r``, ``os.utime``, a restore tool): no one
can set the inode change time, so the manifest keeps it too (FAULTS.md #66). It also
moves when the trainer's rotation removes its link to the file, or on a chmod, which
are no change to the bytes: so a moved ctime is settled by a content sample taken at
pin time (the first and last 64 KiB and 16 blocks between, ~200 KiB a file, read once
more only when the ctime moved). A rewrite with new weights changes every block of a
tensor file; a sample cannot see a single flipped byte between its blocks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from smart_monitor.outputs.pin import Placed

__all__ = ["MANIFEST", "changes", "compare", "hardlinked", "load", "manifest_data", "sample_digest"]

MANIFEST = "manifest.json"


_EDGE = 1 << 16  # bytes sampled at each end of a file
_BLOCK = 1 << 12  # and in each of _BLOCKS blocks spread between
_BLOCKS = 16


def sample_digest(path: Path, size: int) -> str:
    """A digest of ``path``'s first and last 64 KiB and 16 blocks spread between: what
    settles a moved ctime without reading a multi-GB checkpoint."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        spots = [0, max(size - _EDGE, 0)]
        spots += [size * (i + 1) // (_BLOCKS + 1) for i in range(_BLOCKS)]
        for at in spots:
            fh.seek(at)
            h.update(fh.read(_EDGE if at in spots[:2] else _BLOCK))
    return h.hexdigest()


def manifest_data(placed: Iterable[Placed], model: Path | None = None) -> dict[str, Any]:
    """The manifest of ``placed``; with ``model`` (where they were placed), each file's
    inode change time and content sample too."""
    files: dict[str, Any] = {}
    for p in placed:
        entry: dict[str, Any] = {"how": p.how, "size": p.size, "mtime_ns": p.mtime_ns}
        if model is not None:
            entry["ctime_ns"] = os.stat(model / p.rel).st_ctime_ns
            entry["sample"] = sample_digest(model / p.rel, p.size)
        files[p.rel] = entry
    return {"version": 2 if model is not None else 1, "files": files}


def load(snapshot: Path) -> dict[str, Any]:
    """The manifest's files table (written once, at pin time: a caller that checks
    again and again may keep it). Raises OSError/ValueError without one."""
    data = json.loads((snapshot / MANIFEST).read_bytes())
    files = data.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{snapshot / MANIFEST}: no files table")
    return files


def hardlinked(files: dict[str, Any]) -> bool:
    """Whether any file of a manifest was hard-linked: shared with the trainer's file."""
    return any(isinstance(f, dict) and f.get("how") == "hardlink" for f in files.values())


def changes(snapshot: Path, settled: dict[str, int] | None = None) -> list[str]:
    """Each file of ``model/`` that differs from the manifest, as ``"name: what"``;
    empty when the snapshot is as pinned. Raises OSError/ValueError without a manifest.
    ``settled``: file -> a moved ctime its sample already matched at (a caller that
    checks again and again reads each sample once per change, not once per check)."""
    return compare(os.path.join(snapshot, "model"), load(snapshot), settled)


def compare(
    model: str, files: dict[str, Any], settled: dict[str, int] | None = None
) -> list[str]:
    """``changes`` of the ``model`` folder against a manifest's ``files`` already read
    (strings, not Paths: the daemon compares 500 snapshots a reconciliation, #65)."""
    found: list[str] = []
    for rel, want in sorted(files.items()):
        path = os.path.join(model, rel)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            found.append(f"{rel}: missing")
            continue
        if st.st_size != want.get("size"):
            found.append(f"{rel}: size {want.get('size')} -> {st.st_size}")
        elif st.st_mtime_ns != want.get("mtime_ns"):
            found.append(f"{rel}: rewritten (mtime changed)")
        elif want.get("ctime_ns") not in (None, st.st_ctime_ns) and not _same_sample(
            path, st, want.get("sample"), settled
        ):
            found.append(f"{rel}: rewritten (content changed, mtime put back)")
    return found


def _same_sample(
    path: str, st: os.stat_result, want: object, settled: dict[str, int] | None
) -> bool:
    if settled is not None and settled.get(path) == st.st_ctime_ns:
        return True
    same = sample_digest(Path(path), st.st_size) == want
    if same and settled is not None:
        settled[path] = st.st_ctime_ns
    return same
