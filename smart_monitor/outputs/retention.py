"""Keep the snapshot folder within its limits: whole snapshots deleted past
``snapshot.max_count`` and ``snapshot.max_bytes`` (``enforce_retention``), and weights
released to stay within the disk budget (``enforce_budget``, FAULTS.md #31).

Only the bytes a snapshot really adds are counted: a file hard-linked to the trainer's
checkpoint or to another snapshot (``st_nlink > 1``) costs nothing that deleting this
snapshot would give back. (Reflinked files share extents too, but ``stat`` cannot tell;
they are counted in full, which errs on the side of keeping the limit.)

The oldest non-critical snapshots go first, then the oldest critical ones; the newest
best-model snapshot is never removed (it is the one to resume from). A snapshot is
first renamed to a ``.tmp-`` name, then deleted: a reader never sees half of one, and
a crash leaves only a temporary that the next start removes.

The disk budget is on by default, because every pin outlives the trainer's rotation:
snapshots may hold ``max_share`` of their file system, and never push its free space
below ``min_free_share`` of it (journald's ``SystemMaxUse=``/``SystemKeepFree=``
defaults, 10 % and 15 %, for the same reason: a record kept beside the workload must
give way to it). Over either, snapshots *release* their weights (``model/`` goes;
``metadata.json``, the plots and a ``released`` note stay, so the record of what
happened is never lost): the oldest non-critical first, then the oldest critical. A
snapshot whose checkpoint the trainer still has frees nothing and is passed over, so
the newest best model (its checkpoint not yet rotated) keeps its weights.

Best models are bounded on their own (``enforce_keep_best``, in ``run`` and ``replay``
alike): at most ``keep_best`` of them hold weights, older ones are released
(``superseded``; their metadata stays, as every snapshot a ``Created snapshot`` line
names does), and the best model an overfitting conclusion names
(``metadata.json``'s ``overfitting.best_snapshot``) keeps its weights on top of them
while its episode lasts, that is until a newer best model arrives.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smart_monitor.config import SnapshotConfig
from smart_monitor.outputs.snapshot import (
    SNAPSHOT_PREFIX,
    TMP_PREFIX,
    SnapshotWriter,
    write_metadata,
)

__all__ = [
    "DiskBudget", "DiskUsage", "SnapshotCache", "added_bytes", "budget_with", "disk_budget",
    "enforce_budget", "enforce_keep_best", "enforce_retention",
]

Snap = tuple[Path, dict[str, Any]]
DiskUsage = Callable[[Path], Any]  # shutil.disk_usage: (total, used, free)

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


class SnapshotCache:
    """What housekeeping learns of each snapshot, kept between turns (FAULTS.md #65: 20k
    snapshots walked at every reconciliation cost 0.55 % of a core): its metadata, read
    again only when ``metadata.json`` changes, and the bytes deleting it would free. A
    file linked nowhere else stays so; only the files the trainer still shares are
    ``stat``-ed again, as its rotation turns them into bytes the snapshots hold. Of the
    metadata it keeps what retention reads (``_slim``): a snapshot's loss histories and
    config stay on disk (they made 2 MB for 40 snapshots, 100 MB beside 20k)."""

    def __init__(self) -> None:
        # name -> metadata.json's mtime, the metadata, the folder (a Path each turn for
        # 20k snapshots costs more than the stat)
        self._meta: dict[str, tuple[int, dict[str, Any], Path]] = {}
        self._sizes: dict[Path, tuple[int, list[str]]] = {}  # unshared bytes, shared files

    def published(self, writer: SnapshotWriter) -> list[Snap]:
        root = writer.root
        if not root.is_dir():
            return []
        out: list[Snap] = []
        seen: dict[str, tuple[int, dict[str, Any], Path]] = {}
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not entry.name.startswith(SNAPSHOT_PREFIX) or not entry.is_dir():
                continue  # never someone else's folder in a shared snapshot_dir (#58)
            meta = os.path.join(entry.path, "metadata.json")  # strings: 20k Paths cost
            try:
                mtime = os.stat(meta).st_mtime_ns
                known = self._meta.get(entry.name)
                if known is None or known[0] != mtime:
                    with open(meta, "rb") as fh:
                        known = (mtime, _slim(json.loads(fh.read())), Path(entry.path))
                    # rewritten: released by another hand (keep_best on the dispatcher),
                    # or a pin come in; its sizes are learnt again
                    self._sizes.pop(known[2], None)
            except (OSError, ValueError):
                continue
            if not isinstance(known[1], dict) or "created_at" not in known[1]:
                continue  # not made by this writer (SnapshotWriter.published's rule)
            seen[entry.name] = known
            out.append((known[2], known[1]))
        self._meta = seen
        self._sizes = {p: s for p, s in self._sizes.items() if p.name in seen}
        return out

    def added(self, path: Path) -> int:
        known = self._sizes.get(path)
        if known is None:
            known = self._sizes[path] = _sizes(path)
        unshared, shared = known
        still: list[str] = []
        for name in shared:
            try:
                st = os.stat(name, follow_symlinks=False)
            except OSError:
                continue  # released or removed
            if st.st_nlink <= 1:
                unshared += st.st_size  # the trainer's rotation left it to us
            else:
                still.append(name)
        if len(still) != len(shared):
            self._sizes[path] = (unshared, still)
        return unshared

    def forget(self, path: Path) -> None:
        self._sizes.pop(path, None)
        self._meta.pop(path.name, None)


def _sizes(path: Path) -> tuple[int, list[str]]:
    unshared, shared = 0, []
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            name = os.path.join(dirpath, n)
            try:
                st = os.stat(name, follow_symlinks=False)
            except OSError:
                continue
            if st.st_nlink <= 1:
                unshared += st.st_size
            else:
                shared.append(name)
    return unshared, shared


_READ = ("created_at", "triggers", "step", "severity", "key", "released")  # by retention


def _slim(meta: Any) -> Any:
    """The keys of ``metadata.json`` that retention reads (``_READ``, the best snapshot
    an overfitting conclusion names); a value that is not an object as it is."""
    if not isinstance(meta, dict):
        return meta
    out = {k: meta[k] for k in _READ if k in meta}
    overfitting = meta.get("overfitting")
    if isinstance(overfitting, dict) and "best_snapshot" in overfitting:
        out["overfitting"] = {"best_snapshot": overfitting["best_snapshot"]}
    return out


def _oldest_first(cache: SnapshotCache, writer: SnapshotWriter) -> list[Snap]:
    """By ``created_at``: a name freed by a removal is reused within the same second
    (``anomaly_<time>_loss_nonfinite`` after ``..._2``), so names alone misorder them."""
    return sorted(cache.published(writer),
                  key=lambda s: (str(s[1].get("created_at", "")), s[0].name))


def _is_best(meta: dict[str, Any]) -> bool:
    triggers = [str(t) for t in meta.get("triggers", [])]
    return bool(triggers) and all(t.startswith(_BEST) for t in triggers)


def _episode_best(snaps: list[Snap]) -> Path | None:
    """The best model named by the newest overfitting snapshot, while no best model is
    newer than that conclusion (a new best ends the episode)."""
    for _path, meta in reversed(snaps):
        if _is_best(meta):
            return None
        named = meta.get("overfitting", {}).get("best_snapshot")
        if isinstance(named, str) and named:
            return Path(named)
    return None


def enforce_keep_best(
    writer: SnapshotWriter, keep_best: int, log: Any, cache: SnapshotCache | None = None
) -> None:
    """Release the weights of the best models older than the newest ``keep_best`` (the
    one an open overfitting episode names keeps them)."""
    cache = cache or SnapshotCache()
    _keep_best(writer, _oldest_first(cache, writer), keep_best, log, cache)


def _keep_best(
    writer: SnapshotWriter, snaps: list[Snap], keep_best: int, log: Any, cache: SnapshotCache
) -> None:
    protected = _episode_best(snaps)
    # made within one second (a replay): the step orders them, not the name
    held = sorted(
        (s for s in snaps if _is_best(s[1]) and os.path.isdir(os.path.join(s[0], "model"))),
        key=lambda s: (str(s[1].get("created_at", "")), int(s[1].get("step", 0))),
    )
    for snap in held[:-keep_best] if keep_best else []:
        if protected is None or snap[0].name != protected.name:
            _release(writer.root, snap, "superseded", log, keep_best=keep_best)
            cache.forget(snap[0])


def _remove(path: Path, log: Any) -> bool:
    """Rename to a temporary name, then delete: a reader never sees half of it."""
    doomed = path.with_name(f"{TMP_PREFIX}del-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, doomed)
    except OSError as exc:
        log.error("Snapshot removal failed", path=str(path), error=str(exc))
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def enforce_retention(
    writer: SnapshotWriter, max_count: int, max_bytes: int, log: Any,
    cache: SnapshotCache | None = None,
) -> list[str]:
    """Delete snapshots until both limits hold (0: no limit); returns the idempotency
    keys of the deleted ones, so that a restart does not make them again."""
    if not max_count and not max_bytes:
        return []
    cache = cache or SnapshotCache()
    snaps = _oldest_first(cache, writer)
    best = [p for p, m in snaps if _is_best(m)]
    keep = best[-1] if best else None
    sizes = {p: cache.added(p) for p, _ in snaps} if max_bytes else {}
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
        if not _remove(path, log):
            continue
        cache.forget(path)
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


@dataclass(frozen=True, slots=True)
class DiskBudget:
    """Bytes the snapshots hold against their budget, and the file system's free
    space against its floor (0: that limit is off)."""

    held: int
    budget: int
    free: int
    floor: int

    @property
    def over(self) -> bool:
        return bool(self.budget) and self.held > self.budget

    @property
    def low(self) -> bool:
        return bool(self.floor) and self.free < self.floor


def _limits(root: Path, config: SnapshotConfig, usage: DiskUsage) -> tuple[int, int, int]:
    while not root.exists() and root != root.parent:  # before the first snapshot
        root = root.parent
    du = usage(root)
    return int(du.total * config.max_share), int(du.free), int(du.total * config.min_free_share)


def budget_with(
    held: int, writer: SnapshotWriter, config: SnapshotConfig,
    usage: DiskUsage = shutil.disk_usage,
) -> DiskBudget:
    """The budget for ``held`` bytes, with the file system's space read now (one
    ``statvfs``: the free space moves with the trainer, the held bytes with snapshots)."""
    return DiskBudget(held, *_limits(writer.root, config, usage))


def disk_budget(
    writer: SnapshotWriter, config: SnapshotConfig, usage: DiskUsage = shutil.disk_usage,
    cache: SnapshotCache | None = None,
) -> DiskBudget:
    """What ``list`` and ``/metrics`` show."""
    cache = cache or SnapshotCache()
    held = sum(cache.added(p) for p, _ in cache.published(writer))
    return budget_with(held, writer, config, usage)


def _release(root: Path, snap: Snap, reason: str, log: Any, **context: Any) -> int:
    """Drop ``model/`` of one snapshot, after its metadata says so; the bytes freed."""
    path, meta = snap
    model = path / "model"
    if not model.is_dir():
        return 0
    freed = added_bytes(model)
    note = {
        "at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "reason": reason,
        "bytes": freed,
    }
    try:  # the metadata as it stands on disk (the cache keeps a part of it)
        full = json.loads((path / "metadata.json").read_bytes())
        write_metadata(path, {**full, "released": note})
        doomed = root / f"{TMP_PREFIX}rel-{uuid.uuid4().hex[:8]}"
        os.rename(model, doomed)  # the snapshot root: same file system, cleaned at start
    except (OSError, ValueError, TypeError) as exc:  # TypeError: not a JSON object now
        log.error("Snapshot release failed", path=str(path), reason=reason, error=str(exc))
        return 0
    shutil.rmtree(doomed, ignore_errors=True)
    meta["released"] = note
    log.warning(
        "Released snapshot", step=meta.get("step"), triggers=meta.get("triggers", []),
        severity=meta.get("severity"), path=str(path), reason=reason, bytes=freed, **context,
    )
    return freed


def enforce_budget(
    writer: SnapshotWriter, config: SnapshotConfig, log: Any, usage: DiskUsage = shutil.disk_usage,
    cache: SnapshotCache | None = None,
) -> DiskBudget:
    """Supersede old best models' weights, then release weights until the snapshots
    are within their share and the free space above its floor; returns where they
    stand afterwards. A snapshot whose files the trainer still has costs nothing and
    frees nothing: it is passed over until its checkpoint is rotated away."""
    cache = cache or SnapshotCache()
    every = _oldest_first(cache, writer)  # once: 20k snapshots are listed once a turn
    _keep_best(writer, every, config.keep_best, log, cache)
    snaps = [s for s in every if os.path.isdir(os.path.join(s[0], "model"))]
    sizes = {p: cache.added(p) for p, _ in every}
    budget, free, floor = _limits(writer.root, config, usage)
    state = DiskBudget(sum(sizes.values()), budget, free, floor)
    order = [s for s in snaps if s[1].get("severity") != "critical"]
    order += [s for s in snaps if s[1].get("severity") == "critical"]
    for snap in order:
        if not (state.over or state.low):
            break
        if not sizes.get(snap[0]):
            continue
        reason = "budget" if state.over else "free_space"
        freed = _release(
            writer.root, snap, reason, log, held=state.held, budget=state.budget,
            free=state.free, floor=state.floor,
        )
        cache.forget(snap[0])
        state = DiskBudget(state.held - freed, budget, state.free + freed, floor)
    return state
