"""``smart-monitor run`` as a user starts it (``--metrics --checkpoints --output``, no
config file needed), for the tests that train a real model beside it."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from live_harness import SMART_MONITOR, log_text, terminate, wait_until


@contextmanager
def live_daemon(
    run: Path, out: Path, *extra: str, metrics: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Following ``run`` (its ``metrics.jsonl``, or ``metrics``: a file or folder) and
    ready before it yields; SIGTERM (or kill) on the way out."""
    metrics = metrics or run / "metrics.jsonl"
    with open(out.parent / f"{out.name}.stderr", "wb") as err:  # a full pipe would block it
        proc = subprocess.Popen(
            [str(SMART_MONITOR), "run", "--metrics", str(metrics),
             "--checkpoints", str(run), "--output", str(out), *extra],
            stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        wait_until(lambda: " Started " in log_text(out), "the daemon to start", 30)
        yield proc
    finally:
        terminate(proc)


def train_beside_daemon(
    run: Path, out: Path, train: Callable[[Path], None], *extra: str
) -> tuple[list[dict[str, Any]], int]:
    """Run ``train(run)`` while the daemon follows, in which the learning rate goes x50
    once; return the records written and the step where the x50 was first logged,
    after the daemon logged a snapshot for that step and stopped cleanly."""
    run.mkdir()
    with live_daemon(run, out, *extra) as proc:
        train(run)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        lrs = [(r["step"], r["learning_rate"]) for r in records if "learning_rate" in r]
        break_step = next(step for step, lr in lrs if lr > 10 * lrs[0][1])
        logged = f"Created snapshot step={break_step} "
        wait_until(lambda: logged in log_text(out), "the snapshot of the break", 30)
        assert terminate(proc) == 0
    return records, break_step
