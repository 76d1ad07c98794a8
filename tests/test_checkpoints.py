"""When a checkpoint counts as complete, and which one an anomaly pins."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from conftest import make_checkpoint

from smart_monitor.config import CheckpointsConfig
from smart_monitor.sources.checkpoints import INCOMPLETE_MARKER, CheckpointIndex


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def index(root: Path, clock: Clock, **kw: object) -> CheckpointIndex:
    return CheckpointIndex(root, CheckpointsConfig(settle_seconds=30, **kw), clock=clock)  # type: ignore[arg-type]


def test_marker_makes_a_folder_complete_and_tmp_is_never_one(run_dir: Path) -> None:
    idx = index(run_dir, Clock())
    make_checkpoint(run_dir, 100)
    make_checkpoint(run_dir, 200, marker=False)
    (run_dir / "tmp-checkpoint-300").mkdir()
    (run_dir / "tmp-checkpoint-300" / "trainer_state.json").write_text("{}")
    assert [c.name for c in idx.scan()] == ["checkpoint-100"]
    (run_dir / "checkpoint-200" / "trainer_state.json").write_text(json.dumps({"global_step": 200}))
    assert [c.name for c in idx.scan()] == ["checkpoint-200"]
    assert idx.scan() == []


def test_half_written_marker_or_incomplete_file_is_not_complete(run_dir: Path) -> None:
    idx = index(run_dir, Clock())
    ck = make_checkpoint(run_dir, 100, marker=False)
    (ck / "trainer_state.json").write_text('{"global_step": 1')  # still being written
    assert idx.scan() == []
    (ck / "trainer_state.json").write_text('{"global_step": 100}')
    (ck / INCOMPLETE_MARKER).write_text("")
    assert idx.scan() == []
    (ck / INCOMPLETE_MARKER).unlink()
    assert [c.step for c in idx.scan()] == [100]


def test_folder_without_marker_settles_after_quiet_period(run_dir: Path) -> None:
    clock = Clock()
    idx = index(run_dir, clock, marker="done.txt")
    ck = make_checkpoint(run_dir, 100, marker=False)
    assert idx.scan() == []
    clock.t += 20
    (ck / "more.bin").write_bytes(b"x")  # still changing: the quiet period restarts
    assert idx.scan() == []
    clock.t += 29
    assert idx.scan() == []
    clock.t += 2
    assert [c.step for c in idx.scan()] == [100]


def test_single_file_checkpoints_by_pattern(run_dir: Path) -> None:
    clock = Clock()
    idx = index(run_dir, clock, pattern="epoch={epoch}-step={step}.ckpt")
    (run_dir / "epoch=0-step=50.ckpt").write_bytes(b"x" * 100)
    (run_dir / "last.ckpt").write_bytes(b"x")
    assert idx.scan() == []
    clock.t += 31
    assert [(c.name, c.step) for c in idx.scan()] == [("epoch=0-step=50.ckpt", 50)]


def test_newest_at_or_before_orders_by_step_and_forgets_rotated(run_dir: Path) -> None:
    idx = index(run_dir, Clock())
    for step in (900, 1000, 100):  # creation order is not step order
        make_checkpoint(run_dir, step)
    idx.scan()
    assert idx.newest_at_or_before(950).step == 900  # type: ignore[union-attr]  # one exists
    assert idx.newest_at_or_before(5000).step == 1000  # type: ignore[union-attr]  # one exists
    assert idx.newest_at_or_before(99) is None
    shutil.rmtree(run_dir / "checkpoint-900")  # save_total_limit rotation
    idx.scan()
    assert idx.newest_at_or_before(950).step == 100  # type: ignore[union-attr]


def test_missing_root_is_not_an_error(tmp_path: Path) -> None:
    idx = index(tmp_path / "not-yet", Clock())
    assert idx.scan() == []
    make_checkpoint(tmp_path / "not-yet", 10)
    assert [c.step for c in idx.scan()] == [10]


def test_an_unreadable_folder_forgets_what_it_knew(tmp_path: Path) -> None:
    """Running as root, a test cannot be refused a listing: the scandir is injected."""
    make_checkpoint(tmp_path, 100)
    refuse = False

    def scandir(p: Path) -> Iterator[os.DirEntry[str]]:
        if refuse:
            raise PermissionError(13, "Permission denied", str(p))
        return os.scandir(p)

    index = CheckpointIndex(tmp_path, CheckpointsConfig(), scandir=scandir)
    assert [c.step for c in index.scan()] == [100]
    refuse = True
    assert index.scan() == [] and index.newest_at_or_before(100) is None
    assert index.scan() == [] and index.problems == [(tmp_path, "Permission denied")]  # once
    refuse = False
    assert [c.step for c in index.scan()] == [100]  # complete again, reported again
    assert index.unreadable == {}
