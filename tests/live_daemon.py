"""The real ``smart-monitor run`` as a subprocess, for the tests that train a real
model beside it (tests/test_integrations_*.py)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

SMART_MONITOR = Path(sys.executable).with_name("smart-monitor")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def log_text(out: Path) -> str:
    """Every line the daemon logged under ``out/logs``."""
    logs = out / "logs"
    return "".join(p.read_text() for p in sorted(logs.glob("*.log"))) if logs.is_dir() else ""


@contextmanager
def live_daemon(run: Path, out: Path, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    """``smart-monitor run`` following ``run``, started and ready before it yields;
    stopped with SIGTERM (or killed) on the way out."""
    with open(out.parent / f"{out.name}.stderr", "wb") as err:  # a full pipe would block it
        proc = subprocess.Popen(
            [str(SMART_MONITOR), "run", "--metrics", str(run / "metrics.jsonl"),
             "--checkpoints", str(run), "--output", str(out), *extra],
            stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        wait_for(lambda: " Started " in log_text(out), 30, "the daemon to start")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stop(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, and the exit code (0 expected: it saves state and exits)."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=30)
