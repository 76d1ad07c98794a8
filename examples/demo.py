"""``make demo``: a simulated trainer runs while ``smart-monitor run`` follows it live.

Everything goes under ``./demo-output/`` (wiped first): ``run/`` is the trainer's
folder (``metrics.jsonl``, ``checkpoint-N/`` with rotation), ``monitor/`` holds the
snapshots, logs and state. At the end the daemon is stopped with SIGTERM, as systemd
would, and the snapshots and the ``stats`` table are printed.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["main"]

ANOMALIES = ("loss_spike:900", "lr_zscore:1700", "grad_norm_nonfinite:2300")
STEPS, RATE = 3000, 400


def _monitor(*args: str) -> list[str]:
    return [sys.executable, "-m", "smart_monitor", *args]


def _wait_for(path: Path, text: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(text in p.read_text(errors="replace") for p in path.glob("*.log")):
            return True
        time.sleep(0.05)
    return False


def main(out: Path = Path("demo-output")) -> int:
    shutil.rmtree(out, ignore_errors=True)
    run, monitor = out / "run", out / "monitor"
    run.mkdir(parents=True)
    metrics = run / "metrics.jsonl"
    print(f"demo: smart-monitor run follows {metrics} (snapshots in {monitor}/snapshots)")
    with open(out / "daemon.err", "wb") as err:
        daemon = subprocess.Popen(
            _monitor("run", "--metrics", str(metrics), "--checkpoints", str(run),
                     "--output", str(monitor)),
            stdout=subprocess.DEVNULL, stderr=err,
        )
    try:
        if not _wait_for(monitor / "logs", " Started ", 15):
            print("demo: the daemon did not start; see demo-output/daemon.err", file=sys.stderr)
            return 1
        trainer = [sys.executable, str(Path(__file__).with_name("trainer_sim.py")),
                   "--out", str(run), "--steps", str(STEPS), "--rate", str(RATE)]
        for a in ANOMALIES:
            trainer += ["--anomaly", a]
        print(f"demo: simulated trainer, {STEPS} steps at {RATE}/s, "
              f"anomalies {', '.join(ANOMALIES)}")
        subprocess.run(trainer, check=True)
        time.sleep(1.0)  # let the daemon catch the last lines before it is stopped
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
    print(f"demo: daemon stopped by SIGTERM, exit code {code}\n")
    subprocess.run(_monitor("list", "--output", str(monitor)), check=False)
    print()
    subprocess.run(_monitor("stats", "--log-dir", str(monitor / "logs")), check=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
