"""A run that logs hundreds of scalars per step (per-layer norms): cost per scalar and
memory, for a run twice as long, through ``replay --no-plots``.

    .venv/bin/python benchmarks/wide.py [--scalars 500] [--steps 200] [--format FORMAT]

Each step logs ``loss``, ``learning_rate``, a second loss series (``aux_loss``) and
``--scalars`` per-layer grad norms (``grad_norm/layer_N``): every one a series of the
run (kept, shown in ``/metrics``), the two losses watched. The replay runs in a child
process per length (N, 2N, 4N steps), so its peak RSS is its own; memory is bounded
when the longer runs peak at about the same RSS (the series are a fixed set, the
detectors' windows fixed sizes, a backlog read in slices: nothing grows with the
steps). FORMAT: jsonl (default), csv, tensorboard.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import random
import resource
import tempfile
import time
from pathlib import Path

import orjson


def write_run(folder: Path, fmt: str, steps: int, scalars: int) -> Path:
    rng = random.Random(0)
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 2.0 * step**-0.3 * math.exp(rng.gauss(0, 0.03)),
               "learning_rate": 1e-4, "aux_loss": 0.5 * math.exp(rng.gauss(0, 0.03))}  # fmt: skip
        row.update({f"grad_norm/layer_{i}": abs(rng.gauss(1, 0.1)) for i in range(scalars)})
        rows.append(row)
    folder.mkdir(parents=True)
    if fmt == "jsonl":
        path = folder / "metrics.jsonl"
        path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
        return path
    if fmt == "csv":
        path = folder / "metrics.csv"
        keys = list(rows[0])
        lines = [",".join(keys)] + [",".join(str(r[k]) for k in keys) for r in rows]
        path.write_text("\n".join(lines) + "\n")
        return path
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder), max_queue=100_000)
    for r in rows:
        for key, value in r.items():
            if key != "step":
                writer.add_scalar(key, value, r["step"])
    writer.close()
    return folder


def _child(path: str, out: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from smart_monitor.config import load_config
    from smart_monitor.outputs.log import make_logger
    from smart_monitor.runtime.replay import replay

    config = load_config(None, metrics_file=Path(path), snapshot_dir=Path(out) / "snapshots",
                         log_dir=Path(out) / "logs", state_dir=Path(out) / "state")  # fmt: skip
    log, daily = make_logger(config.log_dir, "text", "info", stderr=None)
    t0 = time.perf_counter()
    engine = replay(config, Path(path), log, progress=False)  # no plots: --no-plots
    elapsed = time.perf_counter() - t0
    if daily is not None:
        daily.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    series = getattr(engine, "series", None)  # None: a version before series (a baseline)
    queue.put((elapsed, engine.counts["records"], -1 if series is None else len(series.last), rss))


def measure(path: Path, out: Path) -> tuple[float, int, int, float]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(str(path), str(out), queue))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"the replay failed (exit {proc.exitcode})")
    return queue.get(timeout=10)  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scalars", type=int, default=500)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--format", choices=["jsonl", "csv", "tensorboard"], default="jsonl")
    args = ap.parse_args()
    per_step = args.scalars + 3
    with tempfile.TemporaryDirectory() as tmp:
        for steps in (args.steps, 2 * args.steps, 4 * args.steps):
            path = write_run(Path(tmp) / f"run{steps}", args.format, steps, args.scalars)
            elapsed, records, series, rss = measure(path, Path(tmp) / f"out{steps}")
            scalars = steps * per_step
            print(f"{args.format}: {steps} steps x {per_step} scalars = {scalars:,} scalars, "
                  f"{records} records, {series} series: {elapsed:.2f} s, "
                  f"{elapsed / scalars * 1e6:.2f} us/scalar, peak RSS {rss:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
