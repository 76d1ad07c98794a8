"""How long one state save takes after many large prediction records (FAULTS.md #45).

    .venv/bin/python benchmarks/state_save.py [--records 10000] [--prompt-kb 20]

Feeds the default pipeline train records and prediction examples whose prompts are
each unique and --prompt-kb KB long (what a model-eval callback logs), as parse_line
reads them from the metrics file, then times StateStore.save of the pipeline's state,
the call the daemon's worker makes every ``save_interval_seconds``. The target: under
100 ms, and a state file that does not grow with the prompts.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from smart_monitor.config import Config
from smart_monitor.outputs.state import StateStore
from smart_monitor.pipeline import Pipeline
from smart_monitor.records import parse_line


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=10_000)
    ap.add_argument("--prompt-kb", type=int, default=20)
    args = ap.parse_args()
    rng = random.Random(0)
    pipeline = Pipeline(Config())
    filler = "x" * (args.prompt_kb * 1024)
    for i in range(args.records):
        train = {"step": i, "loss": 1.0 + rng.random() / 100}
        pipeline.process(parse_line(json.dumps(train).encode()))  # type: ignore[arg-type]
        example = {"step": i, "prompt": f"{i} {filler}", "golden_answer": str(i % 7),
                   "model_answer": str(i % 5), "loss": rng.random() * 3}
        pipeline.process(parse_line(json.dumps(example).encode()))  # type: ignore[arg-type]
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            store.save({"engine": {"pipeline": pipeline.state_dict()}})
            times.append((time.perf_counter() - t0) * 1000)
        size = store.path.stat().st_size
    print(f"records: {args.records} train + {args.records} examples, prompts {args.prompt_kb} KB")
    print(f"state.json: {size / 1024:.1f} KiB")
    print(f"save: median {statistics.median(times):.1f} ms, max {max(times):.1f} ms (5 saves)")


if __name__ == "__main__":
    main()
