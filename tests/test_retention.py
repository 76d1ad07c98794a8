"""snapshot.max_count / max_bytes: what goes first, what stays, what is counted."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from live_harness import Live, append, config, line, lines, snapshots

from smart_monitor.outputs.log import make_logger
from smart_monitor.outputs.retention import added_bytes, enforce_retention
from smart_monitor.outputs.snapshot import SnapshotWriter
from smart_monitor.sources.checkpoints import Checkpoint


class Clock:
    def __init__(self) -> None:
        self.t = datetime(2026, 11, 29, 12, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.t += timedelta(seconds=1)
        return self.t


def make(tmp_path: Path, specs: list[tuple[str, str]], mode: str = "copy") -> SnapshotWriter:
    """One snapshot per (trigger, severity), oldest first, each of a 10 kB checkpoint."""
    writer = SnapshotWriter(tmp_path / "snaps", mode, clock=Clock())  # type: ignore[arg-type]
    for i, (trigger, severity) in enumerate(specs):
        ck = tmp_path / "run" / f"checkpoint-{i}"
        ck.mkdir(parents=True)
        (ck / "model.safetensors").write_bytes(b"x" * 10_000)
        meta: dict[str, Any] = {
            "triggers": [trigger], "severity": severity, "step": i, "key": f"0:{i}"
        }
        writer.write(trigger, meta, Checkpoint(ck.name, i, ck))
    return writer


def names(writer: SnapshotWriter) -> list[int]:
    return [m["step"] for _, m in writer.published()]


def quiet_log(tmp_path: Path) -> tuple[Any, Path]:
    log, daily = make_logger(tmp_path / "logs", stderr=None)
    assert daily is not None
    return log, tmp_path / "logs"


def test_no_limits_keep_everything(tmp_path: Path) -> None:
    w = make(tmp_path, [("loss_spike_60.0pct", "warning")] * 3)
    assert enforce_retention(w, 0, 0, quiet_log(tmp_path)[0]) == []
    assert names(w) == [0, 1, 2]


def test_oldest_non_critical_go_first_and_each_is_logged(tmp_path: Path) -> None:
    w = make(tmp_path, [
        ("loss_nonfinite", "critical"),
        ("loss_spike_60.0pct", "warning"),
        ("lr_zscore_9.00", "warning"),
        ("loss_spike_70.0pct", "warning"),
    ])
    log, logs = quiet_log(tmp_path)
    assert enforce_retention(w, 2, 0, log) == ["0:1", "0:2"]
    assert names(w) == [0, 3]
    text = "".join(p.read_text() for p in logs.glob("*.log"))
    assert text.count("Removed snapshot") == 2 and "reason=max_count" in text
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "snaps").iterdir())


def test_critical_go_when_nothing_else_is_left(tmp_path: Path) -> None:
    w = make(tmp_path, [("loss_nonfinite", "critical")] * 3)
    enforce_retention(w, 1, 0, quiet_log(tmp_path)[0])
    assert names(w) == [2]


def test_newest_best_model_is_kept(tmp_path: Path) -> None:
    w = make(tmp_path, [
        ("best_model_loss_1.0000", "info"),
        ("best_model_loss_0.9000", "info"),
        ("loss_spike_60.0pct", "warning"),
        ("loss_spike_70.0pct", "warning"),
    ])
    enforce_retention(w, 1, 0, quiet_log(tmp_path)[0])
    assert names(w) == [1]


def test_bytes_count_only_what_a_snapshot_adds(tmp_path: Path) -> None:
    """Hard links to the trainer's checkpoint add nothing; copies add their size."""
    linked = make(tmp_path / "a", [("loss_spike_60.0pct", "warning")] * 3, mode="hardlink")
    assert all(added_bytes(p) < 5_000 for p, _ in linked.published())  # metadata only
    assert enforce_retention(linked, 0, 20_000, quiet_log(tmp_path)[0]) == []
    copied = make(tmp_path / "b", [("loss_spike_60.0pct", "warning")] * 3, mode="copy")
    assert all(added_bytes(p) > 10_000 for p, _ in copied.published())
    enforce_retention(copied, 0, 25_000, quiet_log(tmp_path / "b")[0])
    assert names(copied) == [1, 2]


def test_live_daemon_applies_limits_and_remembers_what_it_removed(tmp_path: Path) -> None:
    cfg = config(tmp_path, snapshot={"max_count": 1}, detectors={"best_model": {"enabled": False}})
    live = Live(cfg)
    append(cfg.metrics_file, lines(1, 99) + line(100, math.nan) + lines(101, 499)
           + line(500, math.nan) + lines(501, 899) + line(900, math.nan) + lines(901, 910))
    live.wait_log("Removed snapshot", 2)
    live.stop()
    assert [s["step"] for s in snapshots(live.out)] == [900]
    retired = json.loads((cfg.state_dir / "state.json").read_text())["data"]["retired_keys"]
    assert len(retired) == 2
    live = Live(cfg)
    live.stop()
    assert set(retired) <= live.daemon.engine.dispatch.done_keys  # a re-read will not remake them
