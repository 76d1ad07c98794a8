"""Replay throughput against bare JSON parsing of the same file, in the same run.

    .venv/bin/python benchmarks/replay.py [--lines 1000000]

Writes a metrics file of train records shaped like the real HF runs in
../shared/real-runs (loss to 4 places, grad_norm, learning_rate and epoch at full
precision: about 136 bytes a line), an eval record every 500 steps and a loss spike
every 100,000, then times:
  1. bare parsing: orjson.loads on every line (the fastest JSON parser here);
  2. replay: the full pipeline through the Engine, exactly as `smart-monitor replay
     --no-plots`, with logging to a file and the snapshots the anomalies cause; then
     once more as plain `smart-monitor replay`, which also draws each snapshot's
     loss_history.png after the last record (matplotlib's import and one figure per
     snapshot: a fixed cost per snapshot, not per record).
Prints records/s for both and the ratio (the goal: replay >= 1/4 of bare parsing).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import orjson

from smart_monitor.config import load_config
from smart_monitor.outputs.log import make_logger
from smart_monitor.runtime.replay import replay


def write_run(path: Path, lines: int) -> int:
    rng = random.Random(0)
    n = 0
    with open(path, "w") as fh:
        step = 0
        while n < lines:
            step += 1
            loss = (0.6 + 2.5 * (step + 30) ** -0.45) * math.exp(rng.gauss(0, 0.05))
            if step % 100_000 == 0:
                loss *= 4  # an anomaly now and then: replay does real work
            rec = {  # as HF Trainer logs them: loss rounded to 4 places, the rest not
                "loss": round(loss, 4),
                "grad_norm": abs(rng.gauss(1, 0.1)),
                "learning_rate": 3e-4 * min(1.0, step / 2000) * (1 - step / 4e6),
                "epoch": step / 3713.0,
                "step": step,
            }
            fh.write(json.dumps(rec) + "\n")
            n += 1
            if step % 500 == 0:
                fh.write(json.dumps({"eval_loss": 0.6, "eval_accuracy": 0.8, "step": step}) + "\n")
                n += 1
    return n


def bare_parse(path: Path) -> float:
    t0 = time.perf_counter()
    with open(path, "rb") as fh:
        for line in fh:
            orjson.loads(line)
    return time.perf_counter() - t0


def run_replay(path: Path, out: Path, plots: bool = False) -> tuple[float, int]:
    config = load_config(
        None,
        metrics_file=path,
        snapshot_dir=out / "snapshots",
        log_dir=out / "logs",
        state_dir=out / "state",
    )
    log, daily = make_logger(config.log_dir, "text", "info", stderr=None)
    t0 = time.perf_counter()
    engine = replay(config, path, log, progress=False, plots=plots)
    elapsed = time.perf_counter() - t0
    if daily is not None:
        daily.close()
    return elapsed, engine.counts["records"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1_000_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        n = write_run(path, args.lines)
        size = path.stat().st_size
        bare = min(bare_parse(path) for _ in range(3))
        rep, records = run_replay(path, Path(tmp) / "out")
        with_plots, _ = run_replay(path, Path(tmp) / "out-plots", plots=True)
        snaps = len(list((Path(tmp) / "out" / "snapshots").iterdir()))
        print(f"file: {n} lines, {size / n:.0f} bytes/line, {size / 1e6:.0f} MB, {snaps} snapshots")
        print(f"bare orjson parse    : {n / bare:>10,.0f} lines/s   ({bare:.2f} s)")
        print(f"replay --no-plots    : {records / rep:>10,.0f} records/s ({rep:.2f} s)")
        print(
            f"replay (plots drawn) : {records / with_plots:>10,.0f} records/s ({with_plots:.2f} s)"
        )
        print(f"ratio replay/parse   : {bare / rep:.3f}  (goal >= 0.25)")


if __name__ == "__main__":
    main()
