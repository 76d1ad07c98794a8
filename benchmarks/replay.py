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

Then the first ``--events`` records of that run as a TensorBoard event file (written by
``torch.utils.tensorboard.SummaryWriter``, tags as HF names them), timed the same way:
  3. the bare readers: tensorboard's ``EventFileLoader`` (what TensorBoard itself reads
     with: CRC checks, proto parsing, its compat layers), and its raw record reader
     with ``Event.FromString`` alone (no compat layers: the floor of any reader);
  4. ``replay --no-plots`` of the event file: the same reading, the steps gathered into
     records, the full pipeline (the goal: >= 1/2 of the bare reader's rate).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from functools import partial
from pathlib import Path

import orjson

from smart_monitor.config import load_config
from smart_monitor.hooks.attach import attach_plots
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
    attach = partial(attach_plots, log=log, defer=True) if plots else None
    engine = replay(config, path, log, progress=False, attach=attach)
    elapsed = time.perf_counter() - t0
    if daily is not None:
        daily.close()
    return elapsed, engine.counts["records"]


_TAGS = {"loss": "train/loss", "grad_norm": "train/grad_norm", "epoch": "train/epoch",
         "learning_rate": "train/learning_rate", "eval_loss": "eval/loss",
         "eval_accuracy": "eval/accuracy"}


def write_events(jsonl: Path, folder: Path, records: int) -> tuple[Path, int]:
    """The first ``records`` lines of ``jsonl`` as one event file; its path and events."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder), max_queue=4096)
    events = 0
    with open(jsonl, "rb") as fh:
        for _, line in zip(range(records), fh, strict=False):
            rec = orjson.loads(line)
            for key, value in rec.items():
                if key != "step":
                    writer.add_scalar(_TAGS[key], value, rec["step"])
                    events += 1
    writer.close()
    (path,) = folder.glob("events.out.tfevents.*")
    return path, events


def bare_events(path: Path, raw: bool) -> float:
    from tensorboard.backend.event_processing.event_file_loader import (
        EventFileLoader,
        RawEventFileLoader,
    )
    from tensorboard.compat.proto.event_pb2 import Event

    t0 = time.perf_counter()
    if raw:
        for record in RawEventFileLoader(str(path)).Load():
            Event.FromString(record)
    else:
        for _ in EventFileLoader(str(path)).Load():
            pass
    return time.perf_counter() - t0


def event_rows(tmp: Path, jsonl: Path, records: int) -> None:
    path, events = write_events(jsonl, tmp / "tb", records)
    loader = min(bare_events(path, raw=False) for _ in range(2))
    raw = min(bare_events(path, raw=True) for _ in range(2))
    rep, steps = run_replay(path, tmp / "out-tb")
    size = path.stat().st_size
    print(f"event file: {events} scalar events, {steps} records, {size / 1e6:.1f} MB")
    print(f"bare EventFileLoader : {events / loader:>10,.0f} events/s  ({loader:.2f} s)")
    print(f"bare raw records     : {events / raw:>10,.0f} events/s  ({raw:.2f} s)")
    print(f"replay --no-plots    : {events / rep:>10,.0f} events/s  ({rep:.2f} s), "
          f"{steps / rep:,.0f} records/s")
    print(f"ratio replay/loader  : {loader / rep:.3f}  (goal >= 0.5)")
    print(f"ratio replay/raw     : {raw / rep:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--events", type=int, default=20_000, help="records as an event file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.jsonl"
        n = write_run(path, args.lines)
        size = path.stat().st_size
        bare = min(bare_parse(path) for _ in range(3))
        # each the best of three, as the bare parse: a neighbour's burst is not ours
        rep, records = min(run_replay(path, Path(tmp) / f"out{i}") for i in range(3))
        with_plots, _ = run_replay(path, Path(tmp) / "out-plots", plots=True)
        made = Path(tmp) / "out0" / "snapshots"  # none when the run is too short to spike
        snaps = len(list(made.iterdir())) if made.is_dir() else 0
        print(f"file: {n} lines, {size / n:.0f} bytes/line, {size / 1e6:.0f} MB, {snaps} snapshots")
        print(f"bare orjson parse    : {n / bare:>10,.0f} lines/s   ({bare:.2f} s)")
        print(f"replay --no-plots    : {records / rep:>10,.0f} records/s ({rep:.2f} s)")
        print(
            f"replay (plots drawn) : {records / with_plots:>10,.0f} records/s ({with_plots:.2f} s)"
        )
        print(f"ratio replay/parse   : {bare / rep:.3f}  (goal >= 0.25)")
        if args.events:
            event_rows(Path(tmp), path, args.events)


if __name__ == "__main__":
    main()
