"""Inspect speed and memory on a large safetensors checkpoint.

    .venv/bin/python benchmarks/inspect_large.py [--gib 2]

Writes a bf16 + fp32 checkpoint of about ``--gib`` GiB (tensors of up to 256 MiB, one
with NaNs), then runs ``inspect_checkpoint`` on it while a thread samples this
process's anonymous resident memory (``RssAnon``: what cannot be dropped; the mapped
file's pages are page cache, which the kernel reclaims). Prints GiB/s and the peak
anonymous memory beside the checkpoint's size: the claim under test is that a
checkpoint larger than RAM works because the reader never holds more than a chunk.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from smart_monitor.forensics import inspect_checkpoint


def rss_anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


def write_checkpoint(path: Path, gib: float) -> int:
    """Tensors of 64M elements written one file at a time (bounded memory here too)."""
    per = 64 << 20
    n = max(1, int(gib * (1 << 30) / (per * 3)))  # alternate bf16 (2 B) and fp32 (4 B)
    state: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        dtype = torch.bfloat16 if i % 2 == 0 else torch.float32
        t = torch.randn(per, generator=gen).to(dtype)
        if i == n - 1:
            t[:100] = float("nan")
        state[f"model.layers.{i}.mlp.weight"] = t
    save_file(state, path)
    return path.stat().st_size


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=2.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "model.safetensors"
        size = write_checkpoint(path, args.gib)
        base = rss_anon_kib()
        peak = [base]
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.005):
                peak[0] = max(peak[0], rss_anon_kib())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        ins = inspect_checkpoint(path)
        elapsed = time.perf_counter() - t0
        done.set()
        sampler.join()
        assert ins.nonfinite and ins.nonfinite[0]["nan"] == 100
        print(f"checkpoint      {size / 2**30:.2f} GiB, {ins.tensors} tensors, "
              f"{ins.parameters:,} parameters")
        print(f"inspect         {elapsed:.2f} s  ({size / 2**30 / elapsed:.2f} GiB/s)")
        print(f"peak anon RSS   +{(peak[0] - base) / 1024:.0f} MiB above the start "
              f"(chunk: {np.dtype(np.float64).itemsize * (1 << 22) >> 20} MiB as float64)")


if __name__ == "__main__":
    main()
