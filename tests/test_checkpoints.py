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


class RefusingScandir:
    """``os.scandir``, or EACCES while ``refuse`` is set: running as root, a test
    cannot be refused a listing, so the scandir is injected."""

    def __init__(self) -> None:
        self.refuse = False

    def __call__(self, p: Path) -> Iterator[os.DirEntry[str]]:
        if self.refuse:
            raise PermissionError(13, "Permission denied", str(p))
        return os.scandir(p)


def test_an_unreadable_folder_forgets_what_it_knew(tmp_path: Path) -> None:
    make_checkpoint(tmp_path, 100)
    scandir = RefusingScandir()
    index = CheckpointIndex(tmp_path, CheckpointsConfig(), scandir=scandir)
    assert [c.step for c in index.scan()] == [100]
    scandir.refuse = True
    assert index.scan() == [] and index.newest_at_or_before(100) is None
    assert index.scan() == [] and index.problems == [(tmp_path, "Permission denied")]  # once
    scandir.refuse = False
    assert [c.step for c in index.scan()] == [100]  # complete again, reported again
    assert index.unreadable == {}


# -- an idle scan lists nothing (FAULTS.md #65) ---------------------------------------
OLD = 1_000_000_000.0  # a folder mtime long past: no racy listing (sources/folder.py)


class CountingScandir:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, p: Path) -> Iterator[os.DirEntry[str]]:
        self.calls += 1
        return os.scandir(p)


def test_an_unchanged_folder_is_not_listed_again_but_a_new_checkpoint_is_found(
    run_dir: Path,
) -> None:
    """Beside 20,000 checkpoints an idle scan is one ``stat`` of the folder; a checkpoint
    made meanwhile moves the folder's mtime, so the next scan (a reconciliation, with
    no event at all) lists it again and finds it."""
    make_checkpoint(run_dir, 100)
    os.utime(run_dir, (OLD, OLD))
    listing = CountingScandir()
    idx = CheckpointIndex(run_dir, CheckpointsConfig(), scandir=listing)
    assert [c.step for c in idx.scan()] == [100]
    assert idx.scan() == [] and idx.scan() == []
    assert listing.calls == 1, "an unchanged folder was listed again"
    make_checkpoint(run_dir, 200)
    assert [c.step for c in idx.scan()] == [200]
    assert listing.calls == 2


def test_a_checkpoint_being_written_is_looked_at_again_without_a_listing(
    run_dir: Path,
) -> None:
    """Its files arrive inside it, which leaves the run folder's mtime alone: the index
    keeps it among the unfinished ones and checks them at each scan."""
    ck = make_checkpoint(run_dir, 100, marker=False)
    os.utime(run_dir, (OLD, OLD))
    listing = CountingScandir()
    idx = CheckpointIndex(run_dir, CheckpointsConfig(settle_seconds=3600), scandir=listing)
    assert idx.scan() == []
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": 100}))
    assert [c.step for c in idx.scan()] == [100]
    assert listing.calls == 1


def test_rotation_and_a_folder_made_unreadable_are_seen_without_an_event(
    run_dir: Path,
) -> None:
    for step in (100, 200):
        make_checkpoint(run_dir, step)
    os.utime(run_dir, (OLD, OLD))
    scandir = RefusingScandir()
    idx = CheckpointIndex(run_dir, CheckpointsConfig(), scandir=scandir)
    idx.scan()
    shutil.rmtree(run_dir / "checkpoint-100")  # the trainer's save_total_limit
    os.utime(run_dir, (OLD + 1, OLD + 1))  # a coarse clock: only the ctime tells
    idx.scan()
    assert sorted(idx.complete) == [200] and idx.rotations == 1
    os.chmod(run_dir, 0o700)  # a chmod moves the ctime alone
    scandir.refuse = True
    assert idx.scan() == [] and idx.problems == [(run_dir, "Permission denied")]


def test_a_vanished_checkpoint_forgotten_is_found_again_at_the_next_listing(
    run_dir: Path,
) -> None:
    make_checkpoint(run_dir, 100)
    os.utime(run_dir, (OLD, OLD))
    idx = CheckpointIndex(run_dir, CheckpointsConfig())
    idx.scan()
    idx.forget(100)  # a copy found it gone (dispatch); it may be back, re-saved
    assert [c.step for c in idx.scan()] == [100]
