"""The daemon's saved state: one versioned JSON file in ``state_dir``.

Written the way a crash cannot tear it (FAULTS.md #17): the new state goes to
``state.json.tmp``, is fsynced, the current file becomes ``state.json.prev``, the tmp
file is renamed into place and the folder fsynced. Each file carries a hash of its
content, so a torn or NUL-filled one is told from a good one. Loading prefers a valid
tmp file (the newest, when a crash fell between its fsync and its rename), then the
stable file, then ``.prev``; when none is valid the daemon starts fresh and rebuilds
what it must not repeat from the snapshots' own metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smart_monitor.pipeline import STATE_VERSION  # one version for the whole state

__all__ = ["STATE_VERSION", "StateStore"]


def _digest(data: Mapping[str, Any]) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


class StateStore:
    def __init__(self, state_dir: Path, name: str = "state.json") -> None:
        self.dir = state_dir
        self.path = state_dir / name
        self.tmp = state_dir / f"{name}.tmp"
        self.prev = state_dir / f"{name}.prev"

    def save(self, data: Mapping[str, Any]) -> None:
        """Raises OSError when the folder is full or unwritable, leaving the files
        there were (a half-written tmp is removed: it would only hold space)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        doc = {"version": STATE_VERSION, "sha256": _digest(data), "data": data}
        try:
            text = json.dumps(doc, allow_nan=True)  # json.dump streams in Python: 10x slower
            with open(self.tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError:
            self.tmp.unlink(missing_ok=True)
            raise
        if self.path.exists():
            os.replace(self.path, self.prev)
        os.replace(self.tmp, self.path)
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def load(self) -> tuple[dict[str, Any] | None, str | None]:
        """``(data, which file it came from)``, or ``(None, None)`` when no file is valid."""
        for path in (self.tmp, self.path, self.prev):
            data = _read_valid(path)
            if data is not None:
                return data, path.name
        return None, None


def _read_valid(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        return None
    if doc.get("version") != STATE_VERSION or doc.get("sha256") != _digest(doc["data"]):
        return None
    data: dict[str, Any] = doc["data"]
    return data
