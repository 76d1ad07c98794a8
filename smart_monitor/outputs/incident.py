"""An open incident's snapshot, completed when the incident recovers: its
``metadata.json`` ``incident`` block gains the peak, the last detection and the step it
recovered at, as the log's ``Incident recovered`` line with the same id says."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smart_monitor.outputs.snapshot import write_metadata

__all__ = ["record_recovery"]


def record_recovery(snapshot: Path, block: Mapping[str, Any], step: int) -> None:
    """Merge ``block`` into the snapshot's ``incident``, ``"status": "recovered"``.
    Raises OSError or ValueError when the snapshot is gone (retention, a user) or its
    metadata unreadable: the caller logs it, the run goes on."""
    target = snapshot / "metadata.json"
    meta = json.loads(target.read_bytes())
    meta["incident"] = {
        **meta.get("incident", {}), **block, "status": "recovered", "recovered_step": step,
    }
    write_metadata(snapshot, meta)
