"""A simulated trainer, for the demo, the daemon tests and the latency benchmark.

It writes what HF Trainer writes, in HF's order: the metrics of step S (appended to
``metrics.jsonl``, one ``write`` per line), then the eval records, then
``checkpoint-S/`` with the weights first and ``trainer_state.json`` last, then the
``save_total_limit`` rotation that ``rmtree``s the oldest checkpoints. The records come
from ``synthetic.simulate``, so injected anomalies are labelled.

    python examples/trainer_sim.py --out RUN --steps 3000 --rate 300 \\
        --anomaly loss_spike:1200 --anomaly lr_zscore:2200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from synthetic import Anomaly, RunSpec, simulate

__all__ = ["model_bytes", "save_checkpoint", "train"]


def model_bytes(step: int, size: int) -> bytes:
    """The weights of ``checkpoint-<step>``: recognisable, so a test can tell which
    checkpoint a snapshot holds."""
    return (step.to_bytes(4, "little") * (size // 4 + 1))[:size]


def save_checkpoint(out: Path, step: int, size: int, limit: int) -> None:
    ck = out / f"checkpoint-{step}"
    ck.mkdir(parents=True, exist_ok=True)
    (ck / "model.safetensors").write_bytes(model_bytes(step, size))
    (ck / "optimizer.pt").write_bytes(b"\0" * (size // 2))
    (ck / "rng_state.pth").write_bytes(os.urandom(64))
    (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if limit:
        steps = sorted(
            int(p.name.rsplit("-", 1)[1])
            for p in out.glob("checkpoint-*")
            if p.name.rsplit("-", 1)[1].isdigit()
        )
        for old in steps[:-limit]:
            shutil.rmtree(out / f"checkpoint-{old}", ignore_errors=True)


def train(
    out: Path,
    spec: RunSpec,
    rate: float = 300.0,
    save_every: int = 100,
    limit: int = 2,
    size: int = 1 << 16,
) -> int:
    """Write the run at ``rate`` steps per second (0: as fast as possible); returns the
    number of records written."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    t0 = time.monotonic()
    current = 0
    n = 0
    try:
        for record in simulate(spec):
            step = int(record["step"])
            if step != current:
                if current and save_every and current % save_every == 0:
                    save_checkpoint(out, current, size, limit)
                current = step
                if rate:
                    delay = t0 + step / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
            os.write(fd, (json.dumps(record) + "\n").encode())
            n += 1
        if current and save_every and current % save_every == 0:
            save_checkpoint(out, current, size, limit)
    finally:
        os.close(fd)
    return n


def _anomaly(text: str) -> Anomaly:
    kind, _, step = text.partition(":")
    return Anomaly(kind, int(step))


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python examples/trainer_sim.py", description=__doc__)
    p.add_argument("--out", type=Path, required=True, help="run folder (metrics + checkpoints)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--rate", type=float, default=300.0, help="steps per second (0: no pause)")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--save-total-limit", type=int, default=2)
    p.add_argument("--model-bytes", type=int, default=1 << 16)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anomaly", action="append", default=[], type=_anomaly, help="kind:step")
    a = p.parse_args(argv)
    spec = RunSpec(
        steps=a.steps, seed=a.seed, eval_every=a.eval_every, anomalies=tuple(a.anomaly)
    )
    n = train(a.out, spec, a.rate, a.save_every, a.save_total_limit, a.model_bytes)
    print(f"trainer_sim: wrote {n} records, {a.steps} steps to {a.out}")


if __name__ == "__main__":
    main()
