"""How long a snapshot of a large checkpoint takes, per mode.

    .venv/bin/python benchmarks/snapshot.py [--gib 2] [--dir PATH]

Writes an HF-shaped checkpoint (model.safetensors of --gib GiB, optimizer.pt of half
that, small JSON files) on the same file system as the snapshot folder, then times
SnapshotWriter.write in each mode: `auto` (reflink where the file system has it, else
hard links) and `copy`, then what checking a snapshot against its manifest costs
(`smart-monitor verify`, and the daemon's watch of hard-linked snapshots at every
reconciliation). The checkpoint is written with real bytes, not sparse files, so `copy`
pays what it would pay in production.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from smart_monitor.outputs.manifest import changes
from smart_monitor.outputs.snapshot import SnapshotWriter
from smart_monitor.sources.checkpoints import Checkpoint


def write_checkpoint(root: Path, gib: float) -> Checkpoint:
    ck = root / "checkpoint-1000"
    ck.mkdir(parents=True)
    block = os.urandom(1 << 20)
    for name, size in (("model.safetensors", gib), ("optimizer.pt", gib / 2)):
        with open(ck / name, "wb") as fh:
            for _ in range(int(size * 1024)):
                fh.write(block)
    for name in ("config.json", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        (ck / name).write_text(json.dumps({"global_step": 1000}))
    return Checkpoint(ck.name, 1000, ck)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(dir=args.dir))
    try:
        ck = write_checkpoint(base / "run", args.gib)
        total = sum(p.stat().st_size for p in ck.path.iterdir())
        print(f"checkpoint: {total / 2**30:.2f} GiB in {len(list(ck.path.iterdir()))} files")
        for mode in ("auto", "copy"):
            writer = SnapshotWriter(base / f"snapshots-{mode}", mode)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            result = writer.write("loss_zscore_43.20", {"step": 1000}, ck)
            ms = (time.perf_counter() - t0) * 1000
            print(f"mode={mode:<5} -> {result.mode:<8} {ms:>9.1f} ms  ({result.files} files)")
            t0 = time.perf_counter()
            assert changes(result.path) == []
            ms = (time.perf_counter() - t0) * 1000
            print(f"verify {result.mode:<8}         {ms:>9.3f} ms  (stat against manifest.json)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
