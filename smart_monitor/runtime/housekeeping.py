"""The worker's housekeeping at each reconciliation: retention and the disk budget
(``outputs/retention.py``), and the watch over hard-linked snapshots (FAULTS.md #48).

Each does work in proportion to what changed, never to how many folders exist
(FAULTS.md #65: beside 20,000 snapshots and checkpoints, a reconciliation that walked
them all cost 9 % of a core). Retention and the budget run again when what they count
may have moved: a new snapshot, the trainer's rotation (a checkpoint gone from the
index: its pins now hold bytes), an event inside the checkpoint folder (a file
replaced in place), the snapshot folder's own entries (a user removed one), or a free
space under its floor while the snapshots hold bytes to give back; otherwise one
``statvfs`` refreshes the free space, and a sweep every ``SWEEP_SECONDS`` catches
what none of these says (a file replaced under polling, an event lost). The watch
compares ``_LINKED_SLICE`` linked snapshots per reconciliation with their manifests,
in turn, one ``stat`` a file: the list of snapshots is read again only when the
folder changed, and each manifest once, when its snapshot is first listed.
"""

from __future__ import annotations

import bisect
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from smart_monitor.config import SnapshotConfig
from smart_monitor.outputs import manifest
from smart_monitor.outputs.retention import (
    DiskBudget,
    DiskUsage,
    SnapshotCache,
    budget_with,
    enforce_budget,
    enforce_retention,
)
from smart_monitor.outputs.snapshot import SNAPSHOT_PREFIX, SnapshotWriter
from smart_monitor.sources.checkpoints import CheckpointIndex
from smart_monitor.sources.folder import FolderStamp

__all__ = ["SWEEP_SECONDS", "Housekeeping"]

SWEEP_SECONDS = 3600.0  # retention and the budget run at least this often: beside 20k
# snapshots a run costs 0.4 s of CPU, so an hour keeps it under 0.02 % of a core
_LINKED_SLICE = 500  # linked snapshots compared with their manifest per reconciliation


class Housekeeping:
    def __init__(
        self, writer: SnapshotWriter, config: SnapshotConfig, index: CheckpointIndex, log: Any,
        clock: Callable[[], float] = time.monotonic, usage: DiskUsage = shutil.disk_usage,
    ) -> None:
        self.writer = writer
        self.usage = usage
        self.config = config
        self.index = index
        self.log = log
        self.clock = clock
        self.cache = SnapshotCache()  # what retention learnt of each snapshot (#65)
        self.due = True  # something retention counts may have moved: run it next
        self._rotations = index.rotations
        self._next_sweep = 0.0
        self._retain_folder = FolderStamp(writer.root)
        # the watch over linked snapshots
        self.changed: set[str] = set()  # snapshots already reported as changed
        self._unlinked: set[str] = set()  # copied or released: nothing shared to watch
        self._settled: dict[str, int] = {}  # moved ctimes whose content sample matched
        self._watch_folder = FolderStamp(writer.root)
        self._watched: list[str] = []  # sorted: the snapshots still to compare, in turn
        self._manifests: dict[str, dict[str, Any]] = {}  # each read once (written once)
        self._after = ""  # where the next slice begins

    # -- retention and the budget ---------------------------------------------------
    @property
    def budget(self) -> DiskBudget | None:
        """Where the snapshots stand against the budget, as last found. Kept on the
        writer, where ``/metrics`` reads it: a scrape never walks the snapshots (#65)."""
        return self.writer.budget

    @budget.setter
    def budget(self, budget: DiskBudget) -> None:
        self.writer.budget = budget

    def retain(self) -> list[str]:
        """Enforce retention and the budget when something they count may have moved;
        returns the keys of the snapshots removed."""
        now = self.clock()
        if not self._due(now):
            return []
        self.due = False
        self._rotations = self.index.rotations
        self._next_sweep = now + SWEEP_SECONDS
        snap = self.config
        removed = enforce_retention(self.writer, snap.max_count, snap.max_bytes, self.log,
                                    self.cache)
        self.budget = enforce_budget(self.writer, snap, self.log, self.usage, self.cache)
        self._retain_folder.changed()  # our own removals and releases are counted now
        self._retain_folder.listed()
        return removed

    def _due(self, now: float) -> bool:
        if self.due or self.budget is None or now >= self._next_sweep:
            return True
        if self.index.rotations != self._rotations or self._retain_folder.changed():
            return True
        self.budget = budget_with(self.budget.held, self.writer, self.config, self.usage)
        return self.budget.held > 0 and (self.budget.over or self.budget.low)

    # -- the watch over linked snapshots (FAULTS.md #48) ----------------------------
    def watch_linked(self) -> None:
        """Compare a slice of the hard-linked snapshots with their manifests (``stat``
        only): a trainer that re-saves a checkpoint in place changes the snapshot's
        bytes, and that must never be silent. Said once per snapshot."""
        if self._watch_folder.changed():
            self._list()
        todo = self._watched
        start = bisect.bisect_right(todo, self._after)
        turn = todo[start:start + _LINKED_SLICE]
        turn += todo[:min(start, _LINKED_SLICE - len(turn))]  # around, never twice
        self._after = turn[-1] if len(turn) < len(todo) else ""
        for name in turn:
            self._compare(name)

    def _list(self) -> None:
        root = self.writer.root
        try:
            names = {n for n in os.listdir(root) if n.startswith(SNAPSHOT_PREFIX)}  # #58
        except OSError:
            names = set()
        else:
            self._watch_folder.listed()
        self._manifests = {n: f for n, f in self._manifests.items() if n in names}
        self._watched = sorted(names - self.changed - self._unlinked)
        for name in [n for n in self._watched if n not in self._manifests]:
            self._learn(name)  # all at once: a start beside 20k costs them once, then
            # each turn is a slice of stats (a slice of reads kept it busy for minutes)

    def _learn(self, name: str) -> dict[str, Any] | None:
        """The manifest of a snapshot, read once (it is written once, at pin time)."""
        try:
            files = manifest.load(self.writer.root / name)
        except (OSError, ValueError):
            return None  # a pending pin gets its model/ and manifest later: look again
        if not manifest.hardlinked(files):
            self._unwatch(name, unlinked=True)  # copied: never linked later
            return None
        self._manifests[name] = files
        return files

    def _compare(self, name: str) -> None:
        files = self._manifests.get(name) or self._learn(name)
        if files is None:
            return
        try:
            found = manifest.compare(os.path.join(self.writer.root, name, "model"), files,
                                     self._settled)
        except (OSError, ValueError):
            return
        if not found:
            return
        path = self.writer.root / name
        if not (path / "model").is_dir():  # released by the budget: nothing of the
            self._unwatch(name, unlinked=True)  # trainer's left in it
            return
        self._unwatch(name)
        self.changed.add(name)
        self.log.error("Snapshot changed", path=str(path), files=len(found),
                       detail="; ".join(found[:3]), hint="smart-monitor verify")

    def _unwatch(self, name: str, unlinked: bool = False) -> None:
        if unlinked:
            self._unlinked.add(name)
        self._manifests.pop(name, None)
        i = bisect.bisect_left(self._watched, name)
        if i < len(self._watched) and self._watched[i] == name:
            del self._watched[i]
