"""Housekeeping does work in proportion to what changed, never to how many snapshots
and checkpoints exist (FAULTS.md #65), and still sees every change (#31, #48)."""

from __future__ import annotations

import os
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest
from conftest import make_checkpoint

from smart_monitor.config import CheckpointsConfig, SnapshotConfig
from smart_monitor.outputs import manifest
from smart_monitor.outputs.log import make_logger
from smart_monitor.outputs.snapshot import SnapshotWriter
from smart_monitor.runtime import housekeeping
from smart_monitor.runtime.housekeeping import SWEEP_SECONDS, Housekeeping
from smart_monitor.sources.checkpoints import CheckpointIndex

OLD = 1_000_000_000.0  # a folder mtime long past: its listing is trusted (sources/folder.py)
Usage = namedtuple("Usage", "total used free")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def setup(tmp_path: Path, steps: tuple[int, ...] = (10, 20, 30)) -> tuple[
    SnapshotWriter, CheckpointIndex, Any, Path
]:
    run = tmp_path / "run"
    for step in steps:
        make_checkpoint(run, step)
    index = CheckpointIndex(run, CheckpointsConfig())
    writer = SnapshotWriter(tmp_path / "snaps", "hardlink")
    for ck in index.scan():
        writer.write("loss_spike_200.0pct", {"triggers": ["loss_spike_200.0pct"],
                                             "severity": "warning", "step": ck.step,
                                             "key": f"k{ck.step}"}, ck)
    for folder in (run, writer.root):
        os.utime(folder, (OLD, OLD))
    log, _ = make_logger(tmp_path / "logs", stderr=None)
    return writer, index, log, tmp_path / "logs"


def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    runs: list[int] = []
    real = housekeeping.enforce_budget
    monkeypatch.setattr(housekeeping, "enforce_budget",
                        lambda *a, **k: runs.append(1) or real(*a, **k))
    return runs


def test_retention_runs_again_only_when_what_it_counts_moved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, index, log, _ = setup(tmp_path)
    runs = counted(monkeypatch)
    clock = Clock()
    hk = Housekeeping(writer, SnapshotConfig(), index, log, clock)
    hk.retain()
    for _ in range(5):  # idle reconciliations
        hk.retain()
    assert len(runs) == 1, "an idle reconciliation enforced retention again"
    # the trainer's rotation
    shutil.rmtree(index.root / "checkpoint-10")  # type: ignore[operator]  # root is set
    index.scan()
    hk.retain()
    assert len(runs) == 2, "a rotation (its pin now holds bytes) went unnoticed"
    hk.retain()
    hk.due = True  # a new snapshot, or an event inside the checkpoint folder
    hk.retain()
    assert len(runs) == 3
    clock.t += SWEEP_SECONDS  # what no event says (a file replaced under polling)
    hk.retain()
    hk.retain()
    assert len(runs) == 4
    shutil.rmtree(next(writer.root.glob("anomaly_*")))  # a user removes one
    hk.retain()
    assert len(runs) == 5


def test_a_free_space_under_its_floor_releases_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The free space is read at every reconciliation (one statvfs); under the floor,
    with bytes the snapshots hold alone, the budget runs without waiting for a sweep."""
    writer, index, log, logs = setup(tmp_path)
    for step in (10, 20):
        shutil.rmtree(index.root / f"checkpoint-{step}")  # type: ignore[operator]  # rotated
    index.scan()
    free = [10**12]
    hk = Housekeeping(writer, SnapshotConfig(max_share=0.0), index, log, Clock(),
                      usage=lambda _p: Usage(10**12, 0, free[0]))
    hk.retain()
    assert hk.budget is not None and hk.budget.held > 0 and not hk.budget.low
    runs = counted(monkeypatch)
    hk.retain()
    assert runs == []
    free[0] = 10**9  # the trainer filled the disk: under the 15 % floor
    hk.retain()
    assert runs == [1]
    assert "Released snapshot" in "".join(p.read_text() for p in logs.glob("*.log"))


def test_the_linked_watch_reads_each_manifest_once_and_finds_a_rewrite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot published after the first listing is watched too; a released one
    (its model/ gone) is no change; each manifest is read once, however many turns."""
    writer, index, log, logs = setup(tmp_path, (10, 20))
    loads: list[Path] = []
    real = manifest.load
    monkeypatch.setattr(manifest, "load", lambda p: loads.append(p) or real(p))
    hk = Housekeeping(writer, SnapshotConfig(), index, log, Clock())
    for _ in range(3):
        hk.watch_linked()
    assert len(loads) == 2
    make_checkpoint(index.root, 30)  # type: ignore[arg-type]  # a third, pinned later
    [ck] = index.scan()
    new = writer.write("loss_nonfinite", {"triggers": ["loss_nonfinite"],
                                          "severity": "critical", "step": 30, "key": "k30"}, ck)
    released = next(p for p in writer.root.glob("anomaly_*") if p != new.path)
    shutil.rmtree(released / "model")
    for _ in range(3):
        hk.watch_linked()
    assert len(loads) == 3
    with open(ck.path / "model.safetensors", "r+b") as fh:
        fh.write(b"XXXX")  # the trainer re-saves in place, through the shared inode
    os.utime(ck.path / "model.safetensors", (OLD, OLD))
    hk.watch_linked()
    text = "".join(p.read_text() for p in logs.glob("*.log"))
    assert text.count("Snapshot changed") == 1 and f"path={new.path}" in text
