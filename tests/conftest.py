"""Shared fixtures: real files and folders, no mocks."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from smart_monitor.config import SnapshotConfig


def make_checkpoint(
    root: Path, step: int, payload: bytes | None = None, marker: bool = True
) -> Path:
    """A checkpoint folder in HF order: weights first, trainer_state.json last."""
    ck = root / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(
        payload if payload is not None else step.to_bytes(4, "little") * 256
    )
    (ck / "optimizer.pt").write_bytes(os.urandom(64))
    if marker:
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ck


@pytest.fixture
def big_files(tmp_path: Path) -> Iterator[None]:
    """For a test that writes GiB: its files of 64 MiB and more are removed at the end,
    pass or fail (its logs stay). Pytest keeps three runs' folders, and GiB held there
    bring the disk toward the daemon's free-space floor, where the tests beside it
    would see snapshots keep no weights."""
    yield
    for path in tmp_path.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size >= 64 << 20:
            path.unlink()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int) -> None:
    """Under the default free-space floor the daemon releases snapshot weights, as it
    should, and every test that expects weights kept fails: say so beside the failures."""
    du = shutil.disk_usage(tempfile.gettempdir())
    floor = SnapshotConfig().min_free_share
    if exitstatus and du.free < floor * du.total:
        terminalreporter.write_line(
            f"note: {tempfile.gettempdir()} has {du.free / du.total:.0%} free, under the"
            f" monitor's default floor of {floor:.0%}: snapshots keep no weights here",
            yellow=True,
        )
