"""The simulated runs the benchmark, the demo and the tests stand on."""

from __future__ import annotations

import itertools
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import Anomaly, RunSpec, lr_at, simulate

from smart_monitor.records import EvalRecord, ExampleRecord, TrainRecord, to_record


def train(spec: RunSpec) -> list[dict[str, float]]:
    return [r for r in simulate(spec) if "learning_rate" in r]


def test_same_spec_same_records() -> None:
    spec = RunSpec(steps=500, seed=4, anomalies=(Anomaly("loss_spike", 200),))
    assert list(simulate(spec)) == list(simulate(spec))


def test_every_record_parses_as_its_kind() -> None:
    kinds = {type(to_record(r)) for r in simulate(RunSpec(steps=500))}
    assert kinds == {TrainRecord, EvalRecord, ExampleRecord}


@pytest.mark.parametrize("logging", [1, 5, 10])
def test_hf_logging_every_n_steps_averages_the_loss(logging: int) -> None:
    """HF logs the mean over logging_steps: the noise of a logged loss shrinks."""
    recs = train(RunSpec(steps=6000, noise=0.15, logging_steps=logging, eval_every=0))
    assert [r["step"] for r in recs[:2]] == [logging, 2 * logging]
    tail = [r["loss"] for r in recs[len(recs) // 2 :]]
    rel = [math.log(b / a) for a, b in itertools.pairwise(tail)]
    assert statistics.pstdev(rel) == pytest.approx(0.15 * math.sqrt(2 / logging), rel=0.35)


def test_clean_loss_decays_and_has_hard_batches_that_are_not_labelled() -> None:
    recs = train(RunSpec(steps=20000, noise=0.05, eval_every=0))
    losses = [r["loss"] for r in recs]
    assert statistics.mean(losses[:100]) > 1.5 * statistics.mean(losses[-1000:])
    ratios = [b / statistics.median(losses[i : i + 20]) for i, b in enumerate(losses[20:])]
    assert max(ratios) > 1.3, "heavy-tailed hard batches"


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_schedules_warm_up_to_peak(schedule: str) -> None:
    spec = RunSpec(steps=1000, warmup=100, schedule=schedule)  # type: ignore[arg-type]
    assert lr_at(spec, 0) == pytest.approx(spec.peak_lr / 100)
    assert lr_at(spec, 100) == pytest.approx(spec.peak_lr)
    end = lr_at(spec, 999)
    assert (
        end == pytest.approx(spec.peak_lr) if schedule == "constant" else end < 0.01 * spec.peak_lr
    )


def test_each_anomaly_shows_in_the_records() -> None:
    spec = RunSpec(
        steps=3000,
        seed=2,
        logging_steps=10,
        eval_every=250,
        examples_per_eval=16,
        anomalies=(
            Anomaly("loss_spike", 501, 4.0),
            Anomaly("lr_zscore", 800, variant="reset"),
            Anomaly("loss_nonfinite", 1003),
            Anomaly("grad_norm_nonfinite", 1204),
            Anomaly("accuracy_drop", 1300),
            Anomaly("perfect_answer_high_loss", 1400),
            Anomaly("wrong_answer_low_loss", 1600),
            Anomaly("conflicting_labels", 1800),
            Anomaly("inverted_loss_pattern", 2000),
            Anomaly("divergence_detected", 2600, 100),
        ),
    )
    recs = list(simulate(spec))
    by_step = {r["step"]: r for r in recs if "learning_rate" in r}
    assert by_step[510]["loss"] > 2.5 * by_step[490]["loss"]
    assert by_step[800]["learning_rate"] == pytest.approx(spec.peak_lr)
    assert math.isnan(by_step[1010]["loss"]) and not math.isnan(by_step[1020]["loss"])
    assert math.isnan(by_step[1210]["grad_norm"]) and math.isfinite(by_step[1210]["loss"])
    assert by_step[3000]["loss"] > 2 * by_step[2590]["loss"]
    acc = {r["step"]: r["eval_accuracy"] for r in recs if "eval_accuracy" in r}
    assert acc[1500] < acc[1250] - 0.15
    examples = [r for r in recs if "prompt" in r]
    assert any(r["matches"] and r["loss"] == 2.5 for r in examples if r["step"] == 1500)
    assert any(not r["matches"] and r["loss"] == 0.03 for r in examples if r["step"] == 1750)
    answers: dict[str, set[str]] = {}
    for r in examples:
        answers.setdefault(r["prompt"], set()).add(r["golden_answer"])
    assert sum(len(a) > 1 for a in answers.values()) == 1
    late = [r for r in examples if r["step"] > 2000]
    right = statistics.mean(r["loss"] for r in late if r["matches"])
    wrong = statistics.mean(r["loss"] for r in late if not r["matches"])
    assert right > 2 * wrong


def test_detection_benchmark_smoke_run() -> None:
    """The benchmark script runs end to end and meets its own goals on a tiny grid."""
    root = Path(__file__).parents[1]
    out = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "detection.py"), "--tiny"],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "false alarms per 10,000 clean steps" in out.stdout
    assert re.search(r"^inverted loss pattern +\d+ +1\.000", out.stdout, re.M), out.stdout
