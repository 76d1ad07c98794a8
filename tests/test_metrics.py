"""``/metrics`` scraped over real HTTP from an engine fed real lines."""

from __future__ import annotations

import json
import math
import shutil
import socket
import urllib.request
from pathlib import Path

import pytest
from conftest import make_checkpoint
from prometheus_client.parser import text_string_to_metric_families

from smart_monitor.config import Config, load_config
from smart_monitor.events import IncidentSettled
from smart_monitor.hooks.attach import attach_hooks
from smart_monitor.hooks.metrics import MetricsServer
from smart_monitor.outputs.log import make_logger
from smart_monitor.outputs.snapshot import SnapshotWriter
from smart_monitor.runtime.engine import Engine
from smart_monitor.sources.checkpoints import CheckpointIndex


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_engine(tmp_path: Path, clock: Clock, **overrides: object) -> tuple[Engine, Config]:
    run = tmp_path / "run"
    config = load_config(
        checkpoint_dir=run, snapshot_dir=tmp_path / "snaps", log_dir=tmp_path / "logs",
        **overrides,
    )
    log, _ = make_logger(config.log_dir, stderr=None)
    index = CheckpointIndex(run, config.checkpoints, clock=clock)
    engine = Engine(config, log, index, SnapshotWriter(config.snapshot_dir), clock=clock)
    make_checkpoint(run, 10, payload=b"w" * 5000)
    engine.scan_checkpoints()
    return engine, config


def feed(engine: Engine) -> None:
    for step in range(1, 13):
        line = json.dumps({"step": step, "loss": 2.0, "learning_rate": 1e-4}).encode()
        engine.ingest.handle_line(line)
    engine.ingest.handle_line(b'{"step": 13, "loss": NaN}')
    engine.ingest.handle_line(b"{not json")


def scrape(
    port: int, run: str = "run"
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample by name and labels, less ``run`` and ``host``, which every one of
    them must carry (the run folder's name by default, and this host)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = dict(s.labels)
            assert (labels.pop("run", None), labels.pop("host", None)) == (
                run, socket.gethostname()), s
            out[(s.name, tuple(sorted(labels.items())))] = s.value
    return out


def test_scrape_shows_what_the_engine_did(tmp_path: Path) -> None:
    clock = Clock()
    engine, config = make_engine(tmp_path, clock)
    server = MetricsServer(engine, config)  # port 0: any free port, for the test
    engine.listeners.append(server)
    port = server.start()
    try:
        before = scrape(port)
        assert before[("smart_monitor_records_total", ())] == 0
        assert math.isnan(before[("smart_monitor_last_step", ())])  # no record yet
        feed(engine)
        clock.now += 42.5
        m = scrape(port)
        shutil.rmtree(tmp_path / "run" / "checkpoint-10")  # rotated: the pin now costs bytes
        rotated = scrape(port)
    finally:
        server.stop()
    crit = (("severity", "critical"), ("trigger", "loss_nonfinite"))
    assert m[("smart_monitor_records_total", ())] == 13
    assert m[("smart_monitor_malformed_lines_total", ())] == 1
    assert m[("smart_monitor_detections_total", crit)] == 1
    assert m[("smart_monitor_snapshots_total", crit)] == 1
    [(snap, _meta)] = list(engine.writer.published())
    model_bytes = sum(f.stat().st_size for f in (snap / "model").rglob("*") if f.is_file())
    assert m[("smart_monitor_snapshot_bytes_total", ())] == model_bytes > 5000
    assert m[("smart_monitor_last_step", ())] == 13
    assert m[("smart_monitor_seconds_since_last_record", ())] == 42.5
    held = ("smart_monitor_snapshot_held_bytes", ())
    assert rotated[held] - m[held] == model_bytes  # hard links count once unshared
    total = shutil.disk_usage(tmp_path).total
    assert m[("smart_monitor_snapshot_budget_bytes", ())] == int(total * 0.10)
    assert m[("smart_monitor_snapshot_floor_bytes", ())] == int(total * 0.15)


def test_two_engines_keep_separate_counts(tmp_path: Path) -> None:
    servers = []
    for name in ("a", "b"):
        engine, config = make_engine(tmp_path / name, Clock())
        server = MetricsServer(engine, config)
        engine.listeners.append(server)
        servers.append((engine, server, server.start()))
    try:
        feed(servers[0][0])
        counts = [scrape(port)[("smart_monitor_records_total", ())] for _, _, port in servers]
    finally:
        for _, server, _ in servers:
            server.stop()
    assert counts == [13, 0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_attach_hooks_serves_metrics_and_stops(tmp_path: Path) -> None:
    port = free_port()
    engine, config = make_engine(tmp_path, Clock(), metrics={"port": port})
    stop = attach_hooks(engine, config, engine.log)
    try:
        feed(engine)
        assert scrape(port)[("smart_monitor_records_total", ())] == 13
    finally:
        stop()
    with pytest.raises(OSError):
        scrape(port)
    assert engine.listeners == []
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert f"Serving metrics address=127.0.0.1 port={port}" in logs


def test_a_port_in_use_is_logged_and_not_fatal(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        engine, config = make_engine(tmp_path, Clock(), metrics={"port": port})
        stop = attach_hooks(engine, config, engine.log)
        feed(engine)  # the engine runs on without its metrics
        stop()
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "Metrics off" in logs and engine.counts["records"] == 13


def test_series_incidents_and_state_carry_the_run(tmp_path: Path) -> None:
    """The newest value of each main series, an open incident as a gauge that ends when
    it recovers, the pin mode and the daemon's health, all under ``[metrics] run``."""
    clock = Clock()
    engine, config = make_engine(
        tmp_path, clock, metrics={"run": "gpt-7b"},
        policy={"recovery_steps": 5, "recovery_records": 2},
    )
    status = ["following (inotify)"]
    server = MetricsServer(engine, config, lambda: status[0])
    engine.listeners.append(server)
    port = server.start()
    try:
        feed(engine)  # steps 1..12 at loss 2.0, then a NaN at 13
        engine.ingest.handle_line(b'{"step": 13, "eval_loss": 1.5}')
        engine.ingest.handle_line(b'{"step": 14, "loss": NaN, "grad_norm": 3.0}')
        sick = scrape(port, run="gpt-7b")
        status[0] = "degraded: state not saved (disk full)"
        for step in range(15, 25):
            engine.ingest.handle_line(json.dumps({"step": step, "loss": 1.9}).encode())
        well = scrape(port, run="gpt-7b")
    finally:
        server.stop()
    assert math.isnan(sick[("smart_monitor_train_loss", ())])
    assert sick[("smart_monitor_eval_loss", ())] == 1.5
    assert sick[("smart_monitor_learning_rate", ())] == 1e-4
    assert sick[("smart_monitor_grad_norm", ())] == 3.0
    opened = ("smart_monitor_incident_started_step",
              (("problem", "nonfinite"), ("severity", "critical"), ("trigger", "loss_nonfinite")))
    assert sick[opened] == 13
    assert sick[("smart_monitor_degraded", ())] == 0
    assert well[("smart_monitor_degraded", ())] == 1
    assert well[("smart_monitor_train_loss", ())] == 1.9
    assert opened not in well  # recovered: the series is gone, and an alert on it ends
    (mode,) = [dict(k[1]) for k in well if k[0] == "smart_monitor_snapshot_mode_info"]
    assert (mode["mode"], mode["why"]) == engine.writer.mode_in_use  # set at a daemon's start


def test_a_settled_incident_stays_open_in_metrics(tmp_path: Path) -> None:
    """A loss that stays at a worse level ends its incident as settled (issue 18): not a
    recovery, so the incident's series stays and an alert on it keeps firing."""
    clock = Clock()
    engine, config = make_engine(
        tmp_path, clock, policy={"recovery_steps": 5, "recovery_records": 5},
    )
    server = MetricsServer(engine, config)
    engine.listeners.append(server)
    port = server.start()
    settled: list[IncidentSettled] = []
    engine.listeners.append(lambda e: settled.append(e) if isinstance(e, IncidentSettled) else None)
    wiggle = [0.0, 0.02, -0.01, 0.015, -0.02, 0.01]
    try:
        for step in range(1, 400):
            level = 2.0 if step < 200 else 3.0  # a step up that never comes back
            loss = level + wiggle[step % len(wiggle)]
            engine.ingest.handle_line(json.dumps({"step": step, "loss": loss}).encode())
        m = scrape(port)
    finally:
        server.stop()
    assert len(settled) == 1 and settled[0].started == 200
    series = [dict(k[1]) for k, v in m.items()
              if k[0] == "smart_monitor_incident_started_step" and v == 200]
    assert len(series) == 1 and series[0]["problem"] == settled[0].problem


def test_a_scrape_shows_the_daemons_budget_and_walks_no_snapshot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the daemon's housekeeping running, a scrape reads the budget it keeps (its
    free space refreshed at each reconciliation): beside 20,000 snapshots, a walk per
    scrape cost a share of a core (FAULTS.md #65)."""
    from smart_monitor.hooks import metrics
    from smart_monitor.outputs.retention import DiskBudget

    engine, config = make_engine(tmp_path, Clock())
    engine.writer.budget = DiskBudget(held=123, budget=456, free=789, floor=10)

    def walked(*_a: object, **_k: object) -> DiskBudget:
        raise AssertionError("a scrape walked the snapshots")

    monkeypatch.setattr(metrics, "disk_budget", walked)
    server = MetricsServer(engine, config)
    port = server.start()
    try:
        m = scrape(port)
    finally:
        server.stop()
    assert [m[(f"smart_monitor_snapshot_{k}_bytes", ())] for k in
            ("held", "budget", "free", "floor")] == [123, 456, 789, 10]
