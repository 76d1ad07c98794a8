"""The daemon's pictures wait while it reads a backlog (``hold``), as replay's wait for
its last record: a drawing child would take the CPU the reading needs."""

from __future__ import annotations

import json
from pathlib import Path

from live_harness import snapshots, wait_until

from smart_monitor.config import Config
from smart_monitor.events import SnapshotMade
from smart_monitor.hooks.attach import attach_plots
from smart_monitor.outputs.log import make_logger
from smart_monitor.outputs.snapshot import SnapshotWriter
from smart_monitor.pipeline import SnapshotRequest
from smart_monitor.runtime.engine import Engine
from smart_monitor.runtime.replay import replay
from smart_monitor.sources.checkpoints import CheckpointIndex
from smart_monitor.triggers import Severity


def test_a_held_plot_is_drawn_once_the_hold_ends(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": s, "loss": 2.0 - s / 1000} for s in range(1, 200)]
    lines.append({"step": 200, "loss": float("nan")})
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    cfg = Config(snapshot_dir=out / "snapshots", log_dir=out / "logs", state_dir=out / "state")
    log, _ = make_logger(None, stderr=None)
    replay(cfg, metrics, log)
    [meta] = snapshots(out)
    snap: Path = meta["_path"]
    assert not (snap / "loss_history.png").exists()

    engine = Engine(cfg, log, CheckpointIndex(None, cfg.checkpoints), SnapshotWriter(out / "x"))
    asked = 0
    held = True

    def hold() -> bool:
        nonlocal asked
        asked += 1
        return held

    stop = attach_plots(engine, log, hold=hold)
    request = SnapshotRequest("0:200:x", "x", 200, Severity.CRITICAL, (), False, {})
    engine.dispatch.emit(SnapshotMade(request, snap, 0))
    wait_until(lambda: asked >= 3, "the plot asking to start")
    assert not (snap / "loss_history.png").exists()
    held = False
    wait_until(lambda: (snap / "loss_history.png").exists(), "the plot", timeout=120)
    stop()
