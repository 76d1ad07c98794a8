"""Keep the snapshot folder within ``snapshot.max_count`` and ``snapshot.max_bytes``.

Only the bytes a snapshot really adds are counted: a file hard-linked to the trainer's
checkpoint or to another snapshot (``st_nlink > 1``) costs nothing that deleting this
snapshot would give back. (Reflinked files share extents too, but ``stat`` cannot tell;
they are counted in full, which errs on the side of keeping the limit.)

The oldest non-critical snapshots go first, then the oldest critical ones; the newest
best-model snapshot is never removed (it is the one to resume from). A snapshot is
first renamed to a ``.tmp-`` name, then deleted: a reader never sees half of one, and
a crash leaves only a temporary that the next start removes.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from smart_monitor.outputs.snapshot import TMP_PREFIX, SnapshotWriter

__all__ = ["added_bytes", "enforce_retention"]

_BEST = "best_model_loss"


def added_bytes(path: Path) -> int:
    """Bytes that deleting ``path`` would free: files linked nowhere else."""
    total = 0
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            try:
                st = os.stat(os.path.join(dirpath, n), follow_symlinks=False)
            except OSError:
                continue
            if st.st_nlink <= 1:
                total += st.st_size
    return total


def _is_best(meta: dict[str, Any]) -> bool:
    triggers = [str(t) for t in meta.get("triggers", [])]
    return bool(triggers) and all(t.startswith(_BEST) for t in triggers)


def enforce_retention(
    writer: SnapshotWriter, max_count: int, max_bytes: int, log: Any
) -> list[str]:
    """Delete snapshots until both limits hold (0: no limit); returns the idempotency
    keys of the deleted ones, so that a restart does not make them again."""
    if not max_count and not max_bytes:
        return []
    snaps = list(writer.published())  # oldest name (UTC time) first
    best = [p for p, m in snaps if _is_best(m)]
    keep = best[-1] if best else None
    sizes = {p: added_bytes(p) for p, _ in snaps} if max_bytes else {}
    count, total = len(snaps), sum(sizes.values())
    order = [s for s in snaps if s[1].get("severity") != "critical"]
    order += [s for s in snaps if s[1].get("severity") == "critical"]
    removed: list[str] = []
    for path, meta in order:
        over_count = bool(max_count) and count > max_count
        over_bytes = bool(max_bytes) and total > max_bytes
        if not (over_count or over_bytes):
            break
        if path == keep:
            continue
        doomed = path.with_name(f"{TMP_PREFIX}del-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, doomed)
        except OSError as exc:
            log.error("Snapshot removal failed", path=str(path), error=str(exc))
            continue
        shutil.rmtree(doomed, ignore_errors=True)
        count -= 1
        total -= sizes.get(path, 0)
        removed.append(str(meta.get("key", "")))
        log.info(
            "Removed snapshot", path=str(path), step=meta.get("step"),
            triggers=meta.get("triggers", []), severity=meta.get("severity"),
            reason="max_count" if over_count else "max_bytes",
            count=count, bytes=total if max_bytes else None,
        )
    return [k for k in removed if k]
