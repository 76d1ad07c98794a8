"""An open incident's snapshots, completed when the incident ends: each
``metadata.json`` ``incident`` block gains the peak, the last detection, how it ended
(``"status"``: ``recovered``, or ``settled`` at a worse loss level, with both levels and
their ratio) and the step, as the log's ``Incident recovered`` / ``Incident settled``
line with the same id says."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from smart_monitor.outputs.snapshot import write_metadata

__all__ = ["record_end"]


def record_end(snapshot: Path, block: Mapping[str, Any], step: int) -> None:
    """Merge ``block`` (its ``status`` included) into the snapshot's ``incident``, with
    ``recovered_step`` or ``settled_step``. Raises OSError or ValueError when the
    snapshot is gone (retention, a user) or its metadata unreadable: the caller logs
    it, the run goes on."""
    target = snapshot / "metadata.json"
    meta = json.loads(target.read_bytes())
    meta["incident"] = {**meta.get("incident", {}), **block, f"{block['status']}_step": step}
    write_metadata(snapshot, meta)
