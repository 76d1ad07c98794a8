"""The daemon's backlog catch-up against replay, on the same file, in one run.

    .venv/bin/python benchmarks/backlog.py [--lines 1000000]

Both read the file through the same ingestion path (``Ingest.handle_lines``, one block
of lines per read); this measures what the daemon's loop costs on top of it. The file
is benchmarks/replay.py's (train records shaped like the real HF runs, an eval every
500 steps, a loss spike every 100,000) ending in one NaN loss, whose ``Detected
anomaly ... loss_nonfinite`` line in the log marks the last record handled. Then, each
a real process started cold:
  1. ``smart-monitor replay --no-plots``: wall time from spawn to exit;
  2. ``smart-monitor run`` on the finished file with fresh state: wall time from spawn
     to that log line (polled every 5 ms).
Each is also timed from its log alone, ``Started`` to that line: the reading without
the process start (imports, opening the log, the watcher).
Each is run ``--repeat`` times (default 2), alternately, and the best time of each is
shown: on a shared machine the others' load comes and goes, and one run of each can
land on opposite sides of it. The daemon draws its snapshots' pictures in a child
process at nice 10 meanwhile (``replay --no-plots`` draws none): that is part of its
cost on a machine with few free cores.
Both skip the wait for a best model's checkpoint (replay always does; the run has no
checkpoint to wait for). Prints both rates and the ratio (goal: run >= 0.8 x replay).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from replay import write_run  # benchmarks/replay.py: the same file shape

SM = Path(sys.executable).with_name("smart-monitor")
_LAST = "trigger=loss_nonfinite"  # the log line of the file's last record


def write_config(root: Path, metrics: Path) -> Path:
    out = root / "run-out"
    conf = root / "run.toml"
    conf.write_text(
        f'metrics_file = "{metrics}"\ncheckpoint_dir = "{metrics.parent}"\n'
        f'snapshot_dir = "{out}/snapshots"\nlog_dir = "{out}/logs"\nstate_dir = "{out}/state"\n'
        "[snapshot]\ncheckpoint_wait_seconds = 0.0\n"
    )
    return conf


def reading_seconds(logs: Path) -> float:
    """From the ``Started`` line to the last record's, by the log's own timestamps."""
    text = "".join(p.read_text() for p in logs.glob("*.log")).splitlines()
    start = next(line for line in text if " Started " in line)
    last = next(line for line in text if _LAST in line)
    stamp = [datetime.fromisoformat(x.split()[0].replace("Z", "+00:00")) for x in (start, last)]
    return (stamp[1] - stamp[0]).total_seconds()


def time_replay(metrics: Path, out: Path) -> tuple[float, int]:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run(
        [str(SM), "replay", "--metrics", str(metrics), "--output", str(out), "--no-plots"],
        capture_output=True, text=True, check=True,
    )
    elapsed = time.perf_counter() - t0
    found = re.search(r"replayed (\d+) records", done.stdout)
    assert found, done.stdout
    return elapsed, int(found.group(1))


def end_with_nan(metrics: Path) -> None:
    with open(metrics, "rb+") as fh:
        fh.seek(-4096, 2)
        step = json.loads(fh.read().splitlines()[-1])["step"]
        fh.write(b'{"step": %d, "loss": NaN}\n' % (step + 1))


def logged_last(logs: Path) -> bool:
    return any(_LAST in p.read_text() for p in logs.glob("*.log"))


def time_run(root: Path, metrics: Path) -> float:
    shutil.rmtree(root / "run-out", ignore_errors=True)
    conf = write_config(root, metrics)
    logs = root / "run-out" / "logs"
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [str(SM), "run", "--config", str(conf)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        while not logged_last(logs):
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited with {proc.returncode}")
            time.sleep(0.005)
        elapsed = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "run").mkdir()
        metrics = root / "run" / "metrics.jsonl"
        n = write_run(metrics, args.lines - 1)
        end_with_nan(metrics)
        reps: list[tuple[float, float]] = []
        runs: list[float] = []
        reads: list[float] = []
        records = 0
        for _ in range(args.repeat):
            took, records = time_replay(metrics, root / "replay-out")
            reps.append((took, reading_seconds(root / "replay-out" / "logs")))
            runs.append(time_run(root, metrics))
            reads.append(reading_seconds(root / "run-out" / "logs"))
        rep, run = min(t for t, _ in reps), min(runs)
        rep_read, run_read = min(r for _, r in reps), min(reads)
        print(f"file: {n + 1} lines, {records} records, {metrics.stat().st_size / 1e6:.0f} MB")
        print(f"replay --no-plots (process) : {records / rep:>10,.0f} records/s ({rep:.2f} s)")
        print(f"run, backlog cold (process) : {records / run:>10,.0f} records/s ({run:.2f} s)")
        print(f"ratio run/replay            : {rep / run:.3f}  (goal >= 0.8)")
        for label, took in (("replay, reading (log)", rep_read), ("run, reading (log)", run_read)):
            print(f"{label:28}: {records / took:>10,.0f} records/s ({took:.2f} s)")
        print(f"ratio run/replay, reading   : {rep_read / run_read:.3f}")


if __name__ == "__main__":
    main()
