"""FAULTS.md cases 42, 50 and 51: what the trainer writes into the metrics file that
is not what it meant. Each runs the real command on real logs (../shared/real-runs/dev)
under the default config: ``smart-monitor replay``, and for 50 and 51 also the live
``smart-monitor run`` following the file as the trainer appends it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from live_harness import SMART_MONITOR, Live, append, config, log_text, snapshots, wait_until

DEV = Path(__file__).parents[1].parent / "shared" / "real-runs" / "dev"
GOLF = DEV / "openai__parameter-golf__GDN_baseline_seq8192.jsonl"  # two runs, one file
SFT = DEV / "xueh88401-web__qwen2.5-7b-medical-finetune__trainer_log.jsonl"  # LLaMA-Factory
LSTM = DEV / "pypi-data__pypi-mirror-359__nlpia2_LSTM_2l_12ep.jsonl"


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def write(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def replay(metrics: Path, out: Path) -> str:
    subprocess.run(
        [str(SMART_MONITOR), "replay", "--metrics", str(metrics), "--output", str(out),
         "--no-plots"],
        check=True, capture_output=True,
    )
    return log_text(out)


def events(log: str, text: str) -> list[str]:
    return [x for x in log.splitlines() if f" {text} " in x]


def alarms(log: str) -> list[str]:
    """The ``Detected anomaly`` lines of warnings and criticals (a new best is info)."""
    return [x for x in events(log, "Detected anomaly") if "trigger=best_model_loss" not in x]


def anomaly_snapshots(out: Path) -> list[dict[str, Any]]:
    return [m for m in snapshots(out) if not m["triggers"][0].startswith("best_model_loss")]


def test_fault_42_quoted_nan_loss_is_nonfinite(tmp_path: Path) -> None:
    """A JSON encoder that quotes non-finite floats (``default=str``) writes "NaN",
    "nan" or "Infinity": the loss went bad, it is not a line to skip."""
    recs = records(LSTM)
    train = [r for r in recs if "loss" in r]
    bad = {train[60]["step"]: "NaN", train[61]["step"]: "nan", train[62]["step"]: "Infinity"}
    for r in recs:
        if "loss" in r and r["step"] in bad:
            r["loss"] = bad[r["step"]]
    log = replay(write(tmp_path / "quoted.jsonl", recs), tmp_path / "out")
    assert not events(log, "Skipped malformed line"), log
    (first,) = alarms(log)  # the next two belong to its incident: counted, not logged
    assert f"step={train[60]['step']} trigger=loss_nonfinite severity=critical" in first
    (snap,) = anomaly_snapshots(tmp_path / "out")
    assert snap["triggers"] == ["loss_nonfinite"] and snap["step"] == train[60]["step"]
    best = len(events(log, "Detected anomaly")) - 1
    assert f"detections={best + 3} " in log.splitlines()[-1]  # all three counted


def test_fault_50_new_run_into_the_same_file_replay(tmp_path: Path) -> None:
    """parameter-golf: a second run from scratch appended to the log (step 1009 -> 0,
    loss back at 6.94). A new segment with fresh detectors: no alarm against the old
    run, no `Trainer restarted`."""
    log = replay(GOLF, tmp_path / "out")
    (restart,) = events(log, "Run restarted")
    assert "step=1 previous_step=1009 " in restart and "segment=1" in restart
    assert not events(log, "Trainer restarted")
    assert not alarms(log), log
    assert anomaly_snapshots(tmp_path / "out") == []


def test_fault_50_new_run_live_sends_no_signal_to_the_new_trainer(tmp_path: Path) -> None:
    """Live, with the signal action armed at critical against a real process standing
    in for the trainer: the new run is seen as one, and the trainer is left alone."""
    recs = records(GOLF)
    cut = next(i for i in range(1, len(recs)) if recs[i]["step"] < recs[i - 1]["step"])
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pidfile = tmp_path / "trainer.pid"
        pidfile.write_text(f"{trainer.pid}\n")
        live = Live(config(tmp_path, actions={"signal": {"pidfile": str(pidfile)}}))
        try:
            metrics = tmp_path / "run" / "metrics.jsonl"
            append(metrics, "".join(json.dumps(r) + "\n" for r in recs[:cut]).encode())
            wait_until(lambda: live.records >= cut, "the first run", 30)
            append(metrics, "".join(json.dumps(r) + "\n" for r in recs[cut:]).encode())
            live.wait_log(" Run restarted ", timeout=30)
            wait_until(lambda: live.records >= len(recs), "the second run", 30)
        finally:
            live.stop()
        log = live.log()
        assert not alarms(log) and not events(log, "Trainer restarted")
        assert " Action done " not in log and " Action failed " not in log, log
        assert trainer.poll() is None, "the new trainer was signalled"
    finally:
        trainer.kill()
        trainer.wait()


def interleaved(tmp_path: Path) -> tuple[Path, int]:
    """The LLaMA-Factory SFT log written by two processes, the second one record behind
    the first (10, 20, 10, 30, 20, ...), with one loss spike (x4) both write."""
    train = [r for r in records(SFT) if "eval_loss" not in r][:300]
    spike = train[200]["step"]
    train[200] = {**train[200], "loss": train[200]["loss"] * 4}
    mixed = [train[0]]
    for i in range(1, len(train)):
        mixed += [train[i], train[i - 1]]
    mixed.append(train[-1])
    return write(tmp_path / "two_writers.jsonl", mixed), spike


def check_interleaved(log: str, out: Path, spike: int) -> None:
    assert len(events(log, "Interleaved writers")) == 1, log
    assert not events(log, "Trainer restarted") and not events(log, "Run restarted")
    snaps = anomaly_snapshots(out)
    assert [s["step"] for s in snaps] == [spike], snaps
    assert len(log.splitlines()) < 40, log


def test_fault_51_interleaved_writers_replay(tmp_path: Path) -> None:
    path, spike = interleaved(tmp_path)
    out = tmp_path / "out"
    check_interleaved(replay(path, out), out, spike)


def test_fault_51_interleaved_writers_live(tmp_path: Path) -> None:
    path, spike = interleaved(tmp_path)
    data = path.read_bytes().splitlines(keepends=True)
    live = Live(config(tmp_path))
    try:
        for i in range(0, len(data), 100):  # the trainer appends as it goes
            append(tmp_path / "run" / "metrics.jsonl", b"".join(data[i : i + 100]))
            n = min(i + 100, len(data))
            wait_until(lambda: live.records >= n, "the lines", 30)  # noqa: B023 (waited on here)
        live.wait_log(f"Created snapshot step={spike} ", timeout=30)
    finally:
        live.stop()
    check_interleaved(live.log(), tmp_path / "out", spike)
