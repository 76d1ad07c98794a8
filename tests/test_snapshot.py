"""Snapshots: atomic publish, link/copy modes and their fallbacks, vanished sources."""

from __future__ import annotations

import errno
import json
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import make_checkpoint

from smart_monitor.outputs.pin import Placed
from smart_monitor.outputs.snapshot import TMP_PREFIX, SnapshotError, SnapshotWriter, json_safe
from smart_monitor.sources.checkpoints import Checkpoint

NOW = datetime(2026, 11, 29, 17, 0, 0, tzinfo=UTC)


def writer(root: Path, mode: str = "auto") -> SnapshotWriter:
    return SnapshotWriter(root, mode, clock=lambda: NOW)  # type: ignore[arg-type]


def ck(path: Path) -> Checkpoint:
    return Checkpoint(path.name, int(path.name.rsplit("-", 1)[1]), path)


def test_hardlink_snapshot_survives_rotation(run_dir: Path, tmp_path: Path) -> None:
    src = make_checkpoint(run_dir, 500)
    result = writer(tmp_path / "snaps", "hardlink").write(
        "loss_zscore_43.20", {"step": 510}, ck(src)
    )
    shutil.rmtree(src)  # save_total_limit rotation
    assert result.path.name == "anomaly_20261129_170000_loss_zscore_43.20"
    assert result.mode == "hardlink"
    assert (result.path / "model" / "model.safetensors").read_bytes() == (500).to_bytes(
        4, "little"
    ) * 256
    meta = json.loads((result.path / "metadata.json").read_text())
    assert meta["checkpoint"] == {
        "name": "checkpoint-500",
        "step": 500,
        "mode": "hardlink",
        "path": str(src),
        "files": 3,
        "bytes": result.bytes,
    }
    assert meta["created_at"] == "2026-11-29T17:00:00.000Z"


def test_copy_mode_is_isolated_from_in_place_rewrites(run_dir: Path, tmp_path: Path) -> None:
    src = make_checkpoint(run_dir, 500)
    result = writer(tmp_path / "snaps", "copy").write("x", {}, ck(src))
    (src / "model.safetensors").write_bytes(b"rewritten")  # FAULTS.md #23
    assert result.mode in ("copy", "reflink")
    assert (result.path / "model" / "model.safetensors").read_bytes() != b"rewritten"


def test_without_checkpoint_only_metadata_and_a_note(tmp_path: Path) -> None:
    result = writer(tmp_path / "snaps").write("loss_nonfinite", {"step": 3}, None)
    assert sorted(p.name for p in result.path.iterdir()) == ["metadata.json"]
    meta = json.loads((result.path / "metadata.json").read_text())
    assert meta["checkpoint"] is None and "no complete checkpoint" in meta["note"]


def test_existing_name_gets_a_numeric_suffix(tmp_path: Path) -> None:
    w = writer(tmp_path / "snaps")
    names = [w.write("loss_spike_90.0pct", {}, None).path.name for _ in range(3)]
    assert names == [
        "anomaly_20261129_170000_loss_spike_90.0pct",
        "anomaly_20261129_170000_loss_spike_90.0pct_2",
        "anomaly_20261129_170000_loss_spike_90.0pct_3",
    ]


def test_empty_directory_at_the_final_name_is_not_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "snaps"
    (root / "anomaly_20261129_170000_x").mkdir(parents=True)  # rename onto it would succeed
    assert writer(root).write("x", {}, None).path.name == "anomaly_20261129_170000_x_2"


def test_vanished_source_leaves_nothing(run_dir: Path, tmp_path: Path) -> None:
    src = make_checkpoint(run_dir, 500)
    gone = ck(src)
    shutil.rmtree(src)
    root = tmp_path / "snaps"
    with pytest.raises(SnapshotError) as err:
        writer(root).write("x", {}, gone)
    assert err.value.reason == "source_vanished"
    assert list(root.iterdir()) == []


def test_source_deleted_midway_leaves_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer's rotation removes the folder while files are being placed."""
    src = make_checkpoint(run_dir, 500)
    w = writer(tmp_path / "snaps", "copy")
    real_place = w.placer.place
    calls = []

    def place_then_rotate(rel: str, s: Path, t: Path, cancel: object) -> Placed:
        calls.append(s)
        placed = real_place(rel, s, t, None)
        if len(calls) == 1:
            shutil.rmtree(src)
        return placed

    monkeypatch.setattr(w.placer, "place", place_then_rotate)
    with pytest.raises(SnapshotError) as err:
        w.write("x", {}, ck(src))
    assert err.value.reason == "source_vanished"
    assert list((tmp_path / "snaps").iterdir()) == []


def test_disk_full_during_copy_leaves_nothing(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = make_checkpoint(run_dir, 500)

    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "sendfile", full)
    with pytest.raises(SnapshotError) as err:
        writer(tmp_path / "snaps", "copy").write("x", {}, ck(src))
    assert err.value.reason == "no_space"
    assert list((tmp_path / "snaps").iterdir()) == []


def test_cross_device_falls_back_to_copy(run_dir: Path) -> None:
    """EXDEV: the snapshot root on another file system (FAULTS.md #26)."""
    src = make_checkpoint(run_dir, 500)
    root = Path("/dev/shm") / f"sm-test-{os.getpid()}-{id(run_dir)}"  # tmpfs: another fs
    try:
        result = writer(root, "hardlink").write("x", {}, ck(src))
        assert result.mode == "copy"
        assert (result.path / "model" / "optimizer.pt").read_bytes() == (
            src / "optimizer.pt"
        ).read_bytes()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_remove_temporaries_and_published(tmp_path: Path) -> None:
    root = tmp_path / "snaps"
    w = writer(root)
    done = w.write("x", {"key": "0:5:x"}, None)
    (root / f"{TMP_PREFIX}00c0ffee0123" / "model").mkdir(parents=True)
    (root / f"{TMP_PREFIX}build-cache").mkdir()  # someone else's (FAULTS.md #58)
    (root / "anomaly_foreign").mkdir()  # not ours: no metadata.json of ours
    assert [p.name for p in w.remove_temporaries()] == [f"{TMP_PREFIX}00c0ffee0123"]
    assert (root / f"{TMP_PREFIX}build-cache").is_dir()
    assert [(p, m["key"]) for p, m in w.published()] == [(done.path, "0:5:x")]


def test_links_escaping_the_checkpoint_are_not_followed(run_dir: Path, tmp_path: Path) -> None:
    src = make_checkpoint(run_dir, 500)
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"x" * 10)
    (src / "escape.bin").symlink_to(outside)
    (src / "inside.bin").symlink_to(src / "optimizer.pt")
    result = writer(tmp_path / "snaps", "copy").write("x", {}, ck(src))
    names = sorted(p.name for p in (result.path / "model").iterdir())
    assert "escape.bin" not in names and "inside.bin" in names
    assert not (result.path / "model" / "inside.bin").is_symlink()


def test_json_safe_writes_strict_json() -> None:
    data = json_safe({"a": float("nan"), "b": [float("inf"), -float("inf"), 1.0], "c": Path("/x")})
    assert json.loads(json.dumps(data, allow_nan=False)) == {
        "a": "NaN",
        "b": ["Infinity", "-Infinity", 1.0],
        "c": "/x",
    }
