"""The real ``smart-monitor run`` process beside a trainer: signals, systemd's notify
protocol, the simulated trainer, and 50 SIGKILLs at random moments."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from live_harness import (
    EXAMPLES,
    SMART_MONITOR,
    Live,
    append,
    config,
    kill9,
    line,
    lines,
    log_text,
    snapshots,
    spawn,
    terminate,
    wait_until,
    write_checkpoint,
    write_config_file,
)
from trainer_sim import model_bytes


def test_trainer_sim_followed_live_then_sigterm(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    daemon = subprocess.Popen(
        [str(SMART_MONITOR), "run", "--metrics", str(run / "metrics.jsonl"),
         "--checkpoints", str(run), "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: " Started " in log_text(out), "Started")
        subprocess.run(
            [sys.executable, str(EXAMPLES / "trainer_sim.py"), "--out", str(run),
             "--steps", "1200", "--rate", "600", "--save-every", "50",
             "--anomaly", "loss_nonfinite:700"],
            check=True, capture_output=True, timeout=60,
        )
        wait_until(lambda: "Created snapshot step=700 " in log_text(out), "the step-700 snapshot")
        t0 = time.monotonic()
        assert terminate(daemon) == 0
        assert time.monotonic() - t0 < 10
    finally:
        kill9(daemon)
    [snap] = [s for s in snapshots(out) if s["step"] == 700]
    ck = snap["checkpoint"]
    assert ck is not None and ck["step"] <= 700
    data = (snap["_path"] / "model" / "model.safetensors").read_bytes()
    assert data == model_bytes(ck["step"], len(data))  # the trainer rotated it away since
    assert not (run / ck["name"]).exists() or ck["step"] >= 1100
    assert log_text(out).rstrip().splitlines()[-1].split()[2] == "Stopped"


def test_notify_protocol_over_a_datagram_socket(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    conf = write_config_file(cfg, tmp_path / "sm.toml")
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)  # a start-up on a loaded machine: wait on the message, not a clock
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"}
    proc = spawn(conf, tmp_path / "err", env=env)
    try:
        first = sock.recv(4096).decode().split("\n")
        assert first[0] == "READY=1" and f"MAINPID={proc.pid}" in first
        assert any(s.startswith("STATUS=waiting") for s in first)  # no metrics file yet
        msgs = [sock.recv(4096).decode() for _ in range(3)]
        assert "WATCHDOG=1" in msgs
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.jsonl").write_bytes(lines(1, 5))
        seen: list[str] = []
        wait_until(lambda: seen.append(sock.recv(4096).decode()) or
                   any(m.startswith("STATUS=following") for m in seen), "STATUS=following")
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: seen.append(sock.recv(4096).decode()) or
                   any("STOPPING=1" in m for m in seen), "STOPPING=1")
        assert proc.wait(10) == 0
    finally:
        kill9(proc)
        sock.close()


def test_sighup_reopens_the_log_file(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    conf = write_config_file(cfg, tmp_path / "sm.toml")
    proc = spawn(conf, tmp_path / "err")
    out = tmp_path / "out"
    try:
        wait_until(lambda: " Started " in log_text(out), "Started")
        [log] = list((out / "logs").glob("*.log"))
        rotated = log.with_suffix(".log.1")
        os.rename(log, rotated)  # what logrotate does before it sends SIGHUP
        proc.send_signal(signal.SIGHUP)
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "metrics.jsonl").write_bytes(lines(1, 3))
        wait_until(log.exists, "a new log file")  # made by the first line after the reopen
        assert terminate(proc) == 0
    finally:
        kill9(proc)
    new, old = log.read_text(), rotated.read_text()
    assert "Stopped" in new and "Stopped" not in old
    # the metrics file may be opened before or after the reopen: its line is in one file
    assert (new + old).count("Opened metrics file") == 1


def test_config_error_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('metrics_file = "m.jsonl"\n[watch]\nbackend = "telepathy"\n')
    r = subprocess.run([str(SMART_MONITOR), "run", "--config", str(bad)],
                       capture_output=True, timeout=60)
    assert r.returncode == 2 and b"watch.backend" in r.stderr


class Writer(threading.Thread):
    """A trainer at ~500 steps/s: NaN loss every 400 steps (one critical anomaly each,
    beyond the default cooldown), a checkpoint every 20 steps, the two newest kept."""

    def __init__(self, run: Path) -> None:
        super().__init__(daemon=True)
        self.run_dir = run
        self.metrics = run / "metrics.jsonl"
        self.anomalies: list[int] = []
        self.step = 0
        self.halt = threading.Event()

    def run(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.metrics, "ab", buffering=0) as fh:
            while not self.halt.is_set():
                self.step += 1
                s = self.step
                nan = s % 400 == 0
                fh.write(line(s, math.nan) if nan else line(s))
                if nan:
                    self.anomalies.append(s)
                if s % 20 == 0:
                    write_checkpoint(self.run_dir, s)
                    for old in range(s - 60, 0, -20):
                        ck = self.run_dir / f"checkpoint-{old}"
                        if not ck.exists():
                            break
                        for f in ck.iterdir():
                            f.unlink()
                        ck.rmdir()
                time.sleep(0.002)


@pytest.mark.timeout(900)  # 50 start-ups: 8 s each at load 20 on 2 cores (measured)
def test_sigkill_loop_one_snapshot_per_anomaly(tmp_path: Path) -> None:
    cfg = config(
        tmp_path, detectors={"best_model": {"enabled": False}}, state={"save_interval_seconds": 0.1}
    )
    conf = write_config_file(cfg, tmp_path / "sm.toml")
    out = tmp_path / "out"
    writer = Writer(tmp_path / "run")
    writer.start()
    rng = random.Random(7)
    try:
        for i in range(50):
            started = log_text(out).count(" Started ")
            proc = spawn(conf, tmp_path / "err")
            if i % 5:  # most kills fall after start-up: in the backlog, a snapshot, a save
                # a start-up on a loaded machine takes seconds: wait on it, not on a clock
                wait_until(lambda n=started: log_text(out).count(" Started ") > n, "start-up", 120)
            time.sleep(rng.uniform(0.0, 0.4))
            kill9(proc)
        started = log_text(out).count(" Started ")
        proc = spawn(conf, tmp_path / "err")
        wait_until(lambda: log_text(out).count(" Started ") > started, "the last start-up", 120)
        writer.halt.set()
        writer.join()
        want = sorted(writer.anomalies)

        def made() -> set[int]:
            return {s["step"] for s in snapshots(out, running=True)}

        # the last start reads the whole backlog the kills left: minutes under load
        wait_until(lambda: set(want) <= made(), "a snapshot for every anomaly", 300)
        assert terminate(proc) == 0
    finally:
        writer.halt.set()
        kill9(proc)
    snaps = snapshots(out)  # fails on any .tmp-* left
    steps = sorted(s["step"] for s in snaps if any("nonfinite" in t for t in s["triggers"]))
    assert steps == want, "an anomaly without exactly one snapshot"
    for s in snaps:
        ck = s["checkpoint"]
        if ck is not None:
            data = (s["_path"] / "model" / "model.safetensors").read_bytes()
            assert data[:4] == ck["step"].to_bytes(4, "little"), "a partial or wrong model/"
    assert log_text(out).count(" Started ") >= 41
    assert json.loads((cfg.state_dir / "state.json").read_text())["version"] == 1


def test_systemd_unit_template() -> None:
    """The unit's contract: notify + watchdog, no restart on a config error, hardening."""
    unit = Path(__file__).parents[1] / "systemd" / "smart-monitor@.service"
    keys: dict[str, list[str]] = {}
    for row in unit.read_text().splitlines():
        if "=" in row and not row.startswith(("#", "[")):
            k, v = row.split("=", 1)
            keys.setdefault(k, []).append(v)
    assert keys["Type"] == ["notify"] and keys["NotifyAccess"] == ["main"]
    assert "%i.toml" in keys["ExecStart"][0] and " run --config " in keys["ExecStart"][0]
    assert keys["Restart"] == ["on-failure"] and keys["RestartPreventExitStatus"] == ["2"]
    assert keys["WatchdogSec"] and keys["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    for k, v in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateTmp", "yes")):
        assert keys[k] == [v]
    assert keys["StateDirectory"] == ["smart-monitor/%i"] and keys["ReadWritePaths"]


def _best_model_at_50(metrics: Path) -> None:
    """An eval loss that improves at step 50 (the first eval sets the baseline)."""
    append(metrics, lines(1, 30) + b'{"step": 30, "eval_loss": 1.2}\n'
           + lines(31, 50) + b'{"step": 50, "eval_loss": 1.0}\n')


def test_best_model_waiting_for_its_checkpoint_is_finished_on_stop(tmp_path: Path) -> None:
    cfg = config(tmp_path, snapshot={"checkpoint_wait_seconds": 3600})
    write_checkpoint(tmp_path / "run", 40)
    live = Live(cfg)
    _best_model_at_50(cfg.metrics_file)
    live.wait_records(52)
    wait_until(lambda: bool(live.daemon.engine.dispatch.waiting), "the wait for checkpoint-50")
    assert snapshots(live.out) == []
    live.stop()  # SIGTERM: made at once with what exists
    [snap] = snapshots(live.out)
    assert snap["step"] == 50 and snap["checkpoint"]["name"] == "checkpoint-40"


def test_best_model_gets_its_own_checkpoint_when_it_comes(tmp_path: Path) -> None:
    cfg = config(tmp_path, snapshot={"checkpoint_wait_seconds": 3600})
    write_checkpoint(tmp_path / "run", 40)
    live = Live(cfg)
    _best_model_at_50(cfg.metrics_file)
    wait_until(lambda: bool(live.daemon.engine.dispatch.waiting), "the wait for checkpoint-50")
    write_checkpoint(tmp_path / "run", 50)  # HF saves checkpoint-S after logging step S
    live.wait_log("Created snapshot")
    live.stop()
    [snap] = snapshots(live.out)
    assert snap["checkpoint"]["name"] == "checkpoint-50"


def test_best_model_falls_back_once_a_later_checkpoint_shows_its_own_never_comes(
    tmp_path: Path,
) -> None:
    """The trainer saves in step order: checkpoint-60 means checkpoint-50 will not be
    written; waiting on would only let rotation delete checkpoint-40 meanwhile."""
    cfg = config(tmp_path, snapshot={"checkpoint_wait_seconds": 3600})
    write_checkpoint(tmp_path / "run", 40)
    live = Live(cfg)
    _best_model_at_50(cfg.metrics_file)
    wait_until(lambda: bool(live.daemon.engine.dispatch.waiting), "the wait for checkpoint-50")
    write_checkpoint(tmp_path / "run", 60)
    live.wait_log("Created snapshot")
    live.stop()
    [snap] = snapshots(live.out)
    assert snap["checkpoint"]["name"] == "checkpoint-40"


def test_stop_and_reopen_take_no_lock_a_signal_could_find_held(tmp_path: Path) -> None:
    """SIGTERM's and SIGHUP's handlers run on the worker's own thread between two
    bytecodes, so they must take no lock: one the worker holds at that moment would
    never be released (``threading.Event.set`` takes its condition's lock). Every call
    the handlers make is recorded, C calls included, and none may lock; the daemon,
    waiting meanwhile, still stops at once."""
    live = Live(config(tmp_path))
    try:
        live.wait_log(" Started ")
        calls: list[str] = []

        def record(frame: Any, event: str, arg: Any) -> None:
            if event == "c_call":
                calls.append(f"{getattr(arg, '__self__', None).__class__.__name__}.{arg.__name__}")
            elif event == "call":
                calls.append(frame.f_code.co_qualname)

        sys.setprofile(record)
        try:
            live.daemon.reopen_log()
            live.daemon.stop()
        finally:
            sys.setprofile(None)
        assert "Daemon.stop" in calls and any(c.endswith(".put") for c in calls), calls
        locking = [c for c in calls if c.endswith(("acquire", "__enter__"))
                   or c.startswith(("Condition", "Event", "Lock", "RLock"))]
        assert locking == [], locking
        wait_until(lambda: not live.thread.is_alive(), "the worker stopped")
    finally:
        live.stop()
    assert " Stopped " in live.log()
