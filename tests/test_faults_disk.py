"""FAULTS.md cases 31-33 and 43-45, and the shipped unit: the monitor is never the
reason the trainer's disk fills, a full disk of its own never stops it, and absurd
input stays a counted malformed line. Real tmpfs mounts give the real ENOSPC."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_harness import (
    EXAMPLES,
    SMART_MONITOR,
    Live,
    append,
    config,
    line,
    lines,
    spawn,
    terminate,
    tmpfs_mount,
    wait_until,
    write_checkpoint,
    write_config_file,
)
from test_faults import NotifyListener

MIB = 1 << 20


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB file system holding the run and the monitor's output, as on a node
    whose one disk both share."""
    with tmpfs_mount(tmp_path / "fs", "64m") as mounted:
        yield mounted


def fill(where: Path) -> Path:
    """Fill the file system of ``where`` to the last byte (a real ENOSPC)."""
    filler = where / "filler"
    with open(filler, "wb", buffering=0) as fh:  # unbuffered: nothing left to flush
        try:
            while fh.write(b"\1" * MIB):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def top_off(path: Path) -> None:
    """Fill the slack of the last page of ``path`` too (tmpfs lets a file grow into
    its last page on a full disk): blank lines, which every reader skips."""
    with open(path, "ab", buffering=0) as fh:
        try:
            while fh.write(b"\n"):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc


def metadata(path: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((path / "metadata.json").read_text())
    return data


def published(snapshot_dir: Path) -> list[Path]:
    return sorted(p for p in snapshot_dir.glob("anomaly_*") if (p / "metadata.json").is_file())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- 31: the disk budget ------------------------------------------------------------
def test_fault_31_budget_releases_oldest_non_critical_weights_first(fs: Path) -> None:
    cfg = config(fs, watch={"reconcile_seconds": 0.5})  # default budget: 10 %, floor 15 %
    run = fs / "run"
    for step in (100, 200, 300):
        write_checkpoint(run, step, size=3 * MIB)
    data = lines(1, 150, spikes=(120,)) + lines(151, 250) + line(251, float("nan"))
    append(cfg.metrics_file, data + lines(252, 350, spikes=(320,)))  # type: ignore[arg-type]
    live = Live(cfg)
    wait_until(lambda: len(published(cfg.snapshot_dir)) == 3, "three snapshots", 60)
    for step in (100, 200, 300):  # the trainer's rotation: every pin now costs 3 MiB
        shutil.rmtree(run / f"checkpoint-{step}")
    wait_until(lambda: " Released snapshot " in live.log(), "a release", 60)
    live.stop()
    snaps = {metadata(p)["step"]: p for p in published(cfg.snapshot_dir)}
    first, nan, last = snaps[120], snaps[251], snaps[320]
    assert metadata(nan)["severity"] == "critical"
    assert not (first / "model").exists(), "the oldest non-critical snapshot goes first"
    released = metadata(first)["released"]
    assert isinstance(released, dict) and released["reason"] == "budget"
    assert released["bytes"] >= 3 * MIB
    assert (nan / "model" / "model.safetensors").stat().st_size == 3 * MIB, "critical kept"
    assert metadata(first)["checkpoint"], "the metadata still says what was pinned"
    budget = live.daemon.budget
    assert budget is not None and budget.held <= budget.budget
    assert live.log().count(" Released snapshot ") == 1 + (not (last / "model").exists())
    shown = subprocess.run(
        [SMART_MONITOR, "list", "--output", fs / "out"], capture_output=True, text=True,
        check=True, timeout=60,
    ).stdout
    assert "checkpoint-100 (released)" in shown and " budget; free " in shown


def test_fault_31_new_best_model_supersedes_older_best_weights(tmp_path: Path) -> None:
    """Five best models, each after an evaluation that did not improve (no burst): the
    two oldest release their weights (``superseded``); their metadata stays, as every
    snapshot a ``Created snapshot`` line names does."""
    cfg = config(tmp_path)
    run = tmp_path / "run"
    append(cfg.metrics_file, lines(1, 10))  # type: ignore[arg-type]
    live = Live(cfg)  # steps 300 apart: past the default cooldown of 200 steps
    evals = [1.0, 0.9, 0.95, 0.8, 0.85, 0.7, 0.75, 0.6, 0.65, 0.5]  # a baseline, five bests
    for n, (step, value) in enumerate(zip(range(300, 3300, 300), evals, strict=True)):
        append(cfg.metrics_file, lines(step - 289, step))  # type: ignore[arg-type]
        write_checkpoint(run, step)
        append(cfg.metrics_file, line(step, eval_loss=value))  # type: ignore[arg-type]
        if n and n % 2:
            live.wait_log(" Created snapshot ", (n + 1) // 2, timeout=60)
    live.wait_log(" Released snapshot ", 2, timeout=60)
    live.stop()
    best = sorted((p for p in published(cfg.snapshot_dir) if "best_model_loss" in p.name),
                  key=lambda p: int(metadata(p)["step"]))  # type: ignore[call-overload]
    assert [(p / "model").is_dir() for p in best] == [False, False, True, True, True]
    for p in best[:2]:
        released = metadata(p)["released"]
        assert isinstance(released, dict) and released["reason"] == "superseded"
    assert "reason=superseded" in live.log() and "keep_best=3" in live.log()


def test_fault_31_scenario_trainer_never_sees_enospc_critical_kept(fs: Path) -> None:
    """The simulated trainer with rotation on one small disk that also holds its data,
    the monitor on its defaults: a best model every few hundred steps pins a checkpoint,
    two NaN losses pin theirs. Unbounded, the pins would need more than the disk has."""
    run, out = fs / "run", fs / "out"
    append(run / "metrics.jsonl", b"")
    (fs / "dataset.bin").write_bytes(b"\1" * 30 * MIB)  # the training data, same disk
    room = shutil.disk_usage(fs).free
    monitor = subprocess.Popen(
        [SMART_MONITOR, "run", "--metrics", run / "metrics.jsonl", "--checkpoints", run,
         "--output", out], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: (out / "logs").is_dir() and any(
            " Started " in p.read_text() for p in (out / "logs").glob("*.log")), "Started", 60)
        trainer = subprocess.run(
            [sys.executable, EXAMPLES / "trainer_sim.py", "--out", run, "--steps", "8000",
             "--rate", "400", "--save-every", "200", "--eval-every", "200",
             "--save-total-limit", "2", "--model-bytes", str(3 * MIB // 2),
             "--anomaly", "loss_nonfinite:3010", "--anomaly", "loss_nonfinite:6010"],
            capture_output=True, text=True, timeout=300, check=False,
        )
        assert trainer.returncode == 0, trainer.stderr[-2000:]  # no ENOSPC, no traceback
        wait_until(lambda: "checkpoint-8000" in "".join(
            p.read_text() for p in (out / "logs").glob("*.log")), "the last checkpoint", 60)
    finally:
        code = terminate(monitor)
    assert code == 0
    log = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    snaps = [metadata(p) for p in published(out / "snapshots")]
    assert snaps
    # what pinning every checkpoint the monitor saw would take (best models are bounded
    # by keep_best now, so the pins themselves no longer outgrow the disk)
    could = log.count(" Checkpoint complete ") * 3 * MIB // 2
    assert could > room, f"the scenario must offer more ({could}) than the disk had ({room})"
    critical = [p for p in published(out / "snapshots") if metadata(p)["severity"] == "critical"]
    assert len(critical) == 2 and all((p / "model").is_dir() for p in critical), log[-3000:]
    assert " Released snapshot " in log and "Snapshot failed" not in log
    assert shutil.disk_usage(fs).free > 0.15 * 64 * MIB  # the floor held


# -- 32, 33: writes that fail degrade ----------------------------------------------
def _monitor_with_output_on(
    tmp_path: Path, fs: Path, which: str
) -> tuple[subprocess.Popen[bytes], NotifyListener, Path]:
    """``smart-monitor run`` with its ``which`` folder on the small file system ``fs``,
    what it sends to systemd, and its stderr (journald's side)."""
    cfg = config(tmp_path, **{which: fs / which})
    append(cfg.metrics_file, lines(1, 50))  # type: ignore[arg-type]
    write_checkpoint(tmp_path / "run", 50)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    notify = NotifyListener(tmp_path / "notify.sock")
    err = tmp_path / "stderr"
    return spawn(write_config_file(cfg, tmp_path / "c.toml"), err, env=env), notify, err


def test_fault_32_full_log_disk_falls_back_to_stderr_and_resumes(
    tmp_path: Path, fs: Path
) -> None:
    proc, notify, err = _monitor_with_output_on(tmp_path, fs, "log_dir")
    logs = fs / "log_dir"
    try:
        wait_until(lambda: logs.is_dir() and " Started " in "".join(
            p.read_text() for p in logs.glob("*.log")), "Started", 60)
        filler = fill(fs)
        for log_file in logs.glob("*.log"):
            top_off(log_file)
        append(tmp_path / "run" / "metrics.jsonl", lines(51, 150, spikes=(120,)))
        wait_until(lambda: "Created snapshot step=120" in err.read_text(), "the snapshot", 60)
        assert proc.poll() is None, "a full log disk stopped the monitor"
        assert "Created snapshot step=120" not in "".join(p.read_text() for p in logs.glob("*"))
        wait_until(lambda: any("log to stderr only" in m for m, _ in notify.messages),
                   "STATUS= degraded", 30)
        filler.unlink()  # space is back: the next line lands, with the count
        append(tmp_path / "run" / "metrics.jsonl", b"not json: a line the monitor logs\n")
        wait_until(lambda: " Log file resumed " in "".join(p.read_text() for p in logs.glob("*")),
                   "the log resumed", 60)
    finally:
        code = terminate(proc)
        notify.close()
    assert code == 0
    text = "".join(p.read_text() for p in logs.glob("*"))
    assert " Stopped " in text and "lost=" in text
    assert any(m.startswith("STATUS=following") for m, _ in notify.messages[-5:])


def test_fault_33_full_state_disk_backs_off_one_line_and_resumes(
    tmp_path: Path, fs: Path
) -> None:
    proc, notify, err = _monitor_with_output_on(tmp_path, fs, "state_dir")
    state = fs / "state_dir" / "state.json"
    try:
        wait_until(lambda: state.is_file(), "the first save", 60)
        filler = fill(fs)
        append(tmp_path / "run" / "metrics.jsonl", lines(51, 150, spikes=(120,)))
        wait_until(lambda: "State save failed" in err.read_text(), "the failure", 60)
        before = cpu_seconds(proc.pid)
        time.sleep(4)  # the window in which a busy loop would burn a core
        spent = cpu_seconds(proc.pid) - before
        assert spent < 1.0, f"{spent:.2f} s of CPU in 4 s: a busy loop"
        log = err.read_text()
        assert log.count("State save failed") == 1 and f"path={state}" in log
        assert "Created snapshot step=120" in log, "detection and snapshots went on"
        assert any("state not saved" in m for m, _ in notify.messages)
        filler.unlink()
        wait_until(lambda: "State saved again" in err.read_text(), "the retry", 90)
    finally:
        code = terminate(proc)
        notify.close()
    assert code == 0 and json.loads(state.read_text())["data"]["engine"]
    assert not state.with_name("state.json.tmp").exists()


# -- 43, 44, 45: absurd input -------------------------------------------------------
def test_fault_43_deep_nesting_is_too_deep_in_run_replay_and_report(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    deep = b"[" * 100_000 + b"]" * 100_000 + b"\n"
    append(cfg.metrics_file, lines(1, 5) + deep + lines(6, 10))  # type: ignore[arg-type]
    live = Live(cfg)
    live.wait_records(10, timeout=60)
    live.stop()
    assert live.daemon.engine.counts["malformed"] == 1 and "reason=too_deep" in live.log()
    metrics = str(cfg.metrics_file)
    replay = subprocess.run(
        [SMART_MONITOR, "replay", "--metrics", metrics, "--output", tmp_path / "replayed"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert replay.returncode == 0 and "(1 malformed)" in replay.stdout, replay.stderr[-2000:]
    assert "Traceback" not in replay.stderr and "RecursionError" not in replay.stderr
    report = subprocess.run(
        [SMART_MONITOR, "report", "--metrics", metrics, "--output", tmp_path / "replayed"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr[-2000:]


def test_fault_44_absurd_numbers_rejected_or_named_short(tmp_path: Path) -> None:
    metrics = tmp_path / "run" / "metrics.jsonl"
    body = b"".join(
        line(s, learning_rate=1e300 if s == 80 else 2e-4, loss=1e250 if s == 90 else None)
        for s in range(1, 100)
    )
    huge = b'{"step": 1e308, "loss": 1.0}\n{"step": 9223372036854775808, "loss": 1.0}\n'
    append(metrics, body + huge)
    write_checkpoint(tmp_path / "run", 50)
    replay = subprocess.run(
        [SMART_MONITOR, "replay", "--metrics", metrics, "--checkpoints", metrics.parent,
         "--output", tmp_path / "out"], capture_output=True, text=True, timeout=120, check=False,
    )
    assert replay.returncode == 0, replay.stderr[-2000:]
    assert "(2 malformed)" in replay.stdout
    log = "".join(p.read_text() for p in (tmp_path / "out" / "logs").glob("*.log"))
    assert log.count("reason=bad_value") == 2
    names = [p.name for p in (tmp_path / "out" / "snapshots").iterdir()]
    assert any("lr_zscore" in n or "MULTIPLE" in n for n in names), names
    assert all(len(n.encode()) <= 255 for n in names)
    assert "triggers=lr_zscore_1.00e" in log, log[-2000:]


def test_fault_45_prompt_text_never_fills_the_state(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    marker = "UNIQUE-PROMPT-MARKER"
    examples = b"".join(
        (json.dumps({"step": i, "prompt": f"{marker}{i} " + "x" * 20_000,
                     "golden_answer": str(i % 3), "model_answer": str(i % 3), "loss": 0.5})
         + "\n").encode()
        for i in range(2000)
    )
    append(cfg.metrics_file, lines(1, 10) + examples)  # type: ignore[arg-type]
    live = Live(cfg)
    live.wait_records(2010, timeout=120)
    live.stop()
    state = (cfg.state_dir / "state.json").read_text()
    labels = json.loads(state)["data"]["engine"]["pipeline"]["detectors"]["conflicting_labels"]
    assert len(labels["prompt_hashes"]) == 2000
    assert marker not in json.dumps(labels), "the labels table keeps hashes, not prompts"
    assert len(state) < 2 * MIB, f"state.json is {len(state)} bytes"


# -- the unit -----------------------------------------------------------------------
def test_unit_exposure_is_ok(tmp_path: Path) -> None:
    """``systemd-analyze security`` on the instantiated unit; ``make test`` needs the
    ``systemd`` package for it (apt-get install systemd)."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: apt-get install -y systemd"
    unit = tmp_path / "smart-monitor@run1.service"
    unit.write_text((Path(__file__).parents[1] / "systemd" / "smart-monitor@.service").read_text())
    result = subprocess.run(
        [tool, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    overall = [ln for ln in result.stdout.splitlines() if "Overall exposure level" in ln]
    assert overall, result.stdout[-2000:] + result.stderr[-2000:]
    exposure = float(overall[0].split(":")[1].split()[0])
    assert exposure <= 2.5, overall[0]
