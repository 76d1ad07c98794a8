"""Pins still owed after a restart (FAULTS.md #55, #57).

A snapshot whose ``model/`` was being copied, or whose pin failed (no space, EIO) and
waited for a retry, carries a ``pin`` block in its ``metadata.json`` until the pin is
in. A stop settles the copies in flight (their metadata then says they were
abandoned); a SIGKILL, or a pin still failing at the stop, leaves the block. At the
next start these snapshots are found again and their pins retried, so a restart
never turns a pending pin into a lost one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from smart_monitor.outputs.snapshot import SnapshotWriter
from smart_monitor.pipeline import SnapshotRequest
from smart_monitor.triggers import Severity, Trigger, kind_of

__all__ = ["owed_pins"]


def owed_pins(writer: SnapshotWriter) -> Iterator[tuple[SnapshotRequest, Path]]:
    """Each published snapshot still owed its pin, as the request that made it (what
    choosing its checkpoint and logging it need) and its folder."""
    for path, meta in writer.published():
        if not isinstance(meta.get("pin"), dict):
            continue
        try:
            severity, step = Severity(meta["severity"]), int(meta["step"])
            names = [str(n) for n in meta.get("triggers", [])]
        except (KeyError, ValueError, TypeError):
            continue  # not a snapshot this version can read back: left as it is
        triggers = tuple(Trigger(kind_of(n), n, severity, step) for n in names)
        best = bool(names) and all(t.kind == "best_model_loss" for t in triggers)
        key = str(meta.get("key", path.name))
        yield SnapshotRequest(key, path.name, step, severity, triggers, best, {}), path
