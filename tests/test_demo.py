"""``make demo`` end to end: a live trainer, the daemon beside it, SIGTERM, the tables."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from live_harness import EXAMPLES


def test_demo_snapshots_every_injected_anomaly(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo.py")], cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "exit code 0" in r.stdout
    # `smart-monitor list`: time, step, severity, size, checkpoint, triggers, snapshot
    table = r"^\S+ \S+\s+(\d+)\s+\w+\s+[\d.]+ \w+\s+(\S+)\s+\S+\s+(anomaly_\S+)$"
    rows = [(name, step, ck) for step, ck, name in re.findall(table, r.stdout, re.M)]
    steps = {int(step) for _, step, _ in rows}
    assert {900, 1700, 2300} <= steps, r.stdout
    assert re.search(r"^\s+\d+ snapshots in all$", r.stdout, re.M)
    snaps = tmp_path / "demo-output" / "monitor" / "snapshots"
    for name, step, ck in rows:
        meta = json.loads((snaps / name / "metadata.json").read_text())
        assert meta["step"] == int(step)
        if ck != "none":  # the trainer rotated most of them away; the snapshot kept it
            assert (snaps / name / "model" / "model.safetensors").is_file()
    assert not list((tmp_path / "demo-output" / "run").glob("*snap*"))
