"""Every real run in ../shared/real-runs through the pipeline with the default config:
the alarms are exactly the ones docs/detection.md explains."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from smart_monitor.config import Config
from smart_monitor.pipeline import Pipeline
from smart_monitor.records import to_record
from smart_monitor.sources.files import trainer_state_history

REAL_RUNS = Path(__file__).parents[1].parent / "shared" / "real-runs"
FILES = sorted(REAL_RUNS.glob("*.json"))

# file -> (trigger name, step) of every alarm (best_model_loss is information, apart).
EXPECTED: dict[str, list[tuple[str, int]]] = {
    # fp16 loss scaler: grad_norm NaN at steps 1, 2, 6 while the loss stays finite
    "ChenguangYang96UCR__KG-LLM__outputs.json": [
        ("grad_norm_nonfinite", 1),
        ("grad_norm_nonfinite", 2),
        ("grad_norm_nonfinite", 6),
    ],
}


def alarms(path: Path) -> tuple[list[tuple[str, int]], int]:
    history = trainer_state_history(path)
    assert history is not None, f"{path.name} is not a trainer_state.json"
    pipeline = Pipeline(Config())
    out, best = [], 0
    for entry in history:
        record = to_record(entry)
        outcome = pipeline.process(record) if record is not None else None
        for t in outcome.triggers if outcome is not None else ():
            if t.kind == "best_model_loss":
                best += 1
            else:
                out.append((t.name, t.step))
    return out, best


def test_the_real_runs_are_there() -> None:
    assert len(FILES) >= 14, f"expected the real runs in {REAL_RUNS}"


@pytest.mark.parametrize("path", FILES, ids=[p.name.split("__")[1] for p in FILES])
def test_alarms_on_each_real_run_are_the_documented_ones(path: Path) -> None:
    got, best = alarms(path)
    assert got == EXPECTED.get(path.name, []), path.name
    assert best < 60, "a best model on every lucky batch"


def test_grad_norm_nan_severity_on_the_fp16_run() -> None:
    history = trainer_state_history(REAL_RUNS / "ChenguangYang96UCR__KG-LLM__outputs.json")
    assert history is not None
    pipeline = Pipeline(Config())
    outcomes = [pipeline.process(r) for e in history if (r := to_record(e)) is not None]
    snapshots = [o.snapshot for o in outcomes if o is not None and o.snapshot is not None]
    nan = [s for s in snapshots if s.triggers[0].kind == "grad_norm_nonfinite"]
    assert [s.step for s in nan] == [1], "steps 2 and 6 belong to the incident of step 1"


def test_replay_report_and_incident_recovery_on_the_fp16_run(tmp_path: Path) -> None:
    """``replay --report`` prints per trigger type the count and the steps; the log
    says when the incident started, peaked and recovered."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "smart_monitor",
            "replay",
            "--report",
            "--output",
            str(tmp_path),
            "--metrics",
            str(REAL_RUNS / "ChenguangYang96UCR__KG-LLM__outputs.json"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert re.search(r"^grad_norm_nonfinite +3  1, 2, 6$", out, re.M), out
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("smart_monitor_*.log"))
    (line,) = [x for x in log.splitlines() if "Incident recovered" in x]
    assert "started=1 " in line and "peak_step=2 " in line and "last_detection=6 " in line
    (meta,) = [
        json.loads(p.read_text())
        for p in (tmp_path / "snapshots").glob("*/metadata.json")
        if "grad_norm" in p.parent.name
    ]
    incident = meta["incident"]
    assert (incident["id"], incident["status"], incident["recovered_step"]) == (
        "nonfinite@1",
        "recovered",
        107,
    )
    assert (incident["started"], incident["peak_step"], incident["last"]) == (1, 2, 6)
