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
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from smart_monitor.outputs.pin import Placed

__all__ = ["MANIFEST", "changes", "linked", "manifest_data"]

MANIFEST = "manifest.json"


def manifest_data(placed: Iterable[Placed]) -> dict[str, Any]:
    return {
        "version": 1,
        "files": {p.rel: {"how": p.how, "size": p.size, "mtime_ns": p.mtime_ns} for p in placed},
    }


def _load(snapshot: Path) -> dict[str, Any]:
    data = json.loads((snapshot / MANIFEST).read_bytes())
    files = data.get("files")
    if not isinstance(files, dict):
        raise ValueError(f"{snapshot / MANIFEST}: no files table")
    return files


def linked(snapshot: Path) -> bool:
    """Whether any file of the snapshot shares its inode with the trainer's file: the
    ones worth watching. A snapshot whose ``model/`` the disk budget released has none."""
    if not (snapshot / "model").is_dir():
        return False
    try:
        return any(f.get("how") == "hardlink" for f in _load(snapshot).values())
    except (OSError, ValueError):
        return False


def changes(snapshot: Path) -> list[str]:
    """Each file of ``model/`` that differs from the manifest, as ``"name: what"``;
    empty when the snapshot is as pinned. Raises OSError/ValueError without a manifest."""
    files = _load(snapshot)
    model = snapshot / "model"
    found: list[str] = []
    for rel, want in sorted(files.items()):
        try:
            st = os.stat(model / rel)
        except FileNotFoundError:
            found.append(f"{rel}: missing")
            continue
        if st.st_size != want.get("size"):
            found.append(f"{rel}: size {want.get('size')} -> {st.st_size}")
        elif st.st_mtime_ns != want.get("mtime_ns"):
            found.append(f"{rel}: rewritten (mtime changed)")
    return found
