"""Every registered detector: resume (JSON state round-trip at random points), rewind,
and its seed example; each family against a batch oracle (numpy over the same window
after every update) in tests/test_detectors_oracle.py."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from typing import Any

import numpy as np
import pytest
from synthetic import Anomaly, RunSpec, simulate

from smart_monitor.config import (
    AccuracyDropConfig,
    BestModelConfig,
    ConflictingLabelsConfig,
    DetectorsConfig,
    DivergenceConfig,
    LossSpikeConfig,
    LossZScoreConfig,
    LrZScoreConfig,
    NonFiniteConfig,
    PredictionsConfig,
)
from smart_monitor.detectors import REGISTRY, Detector
from smart_monitor.detectors.evaluation import AccuracyDrop, BestModel
from smart_monitor.detectors.labels import ConflictingLabels
from smart_monitor.detectors.loss import Divergence, LossSpike, NonFinite
from smart_monitor.detectors.predictions import InvertedLossPattern, PredictionOutliers
from smart_monitor.detectors.zscore import LossZScore, LrZScore
from smart_monitor.records import EvalRecord, ExampleRecord, Record, TrainRecord, to_record
from smart_monitor.triggers import Severity, Trigger

# Small windows and thresholds so that every detector fires and holds state often.
BUSY = DetectorsConfig.model_validate(
    {
        "loss_zscore": {"window": 10, "warmup": 5, "threshold": 3.0, "relearn": 3},
        "lr_zscore": {"window": 6, "warmup": 3, "threshold": 3.0},
        "loss_spike": {"window": 9, "warmup": 5, "threshold_pct": 20.0, "min_robust_z": 2.0},
        "divergence": {"window": 5, "warmup": 10, "factor": 1.1, "patience": 3},
        "best_model": {"min_rel_delta": 0.0, "train_min_steps": 20},
        "accuracy_drop": {"threshold_pct": 2.0},
        "overfitting": {"patience": 2, "min_rel_delta": 0.0, "noise_k": 0.0,
                        "train_tolerance": 10.0},
        "not_learning": {"min_records": 200, "min_rel_drop": 0.9, "trend_t": 1e6},
        "predictions": {
            "high_loss": 1.0,
            "low_loss": 0.3,
            "inverted_window": 20,
            "inverted_min_each": 4,
            "inverted_alpha": 0.05,
        },
        "conflicting_labels": {"max_prompts": 30},
    }
)


def stream(seed: int = 3) -> list[Record]:
    """A busy synthetic run: every anomaly kind, noise, evals and examples."""
    spec = RunSpec(
        steps=1500,
        seed=seed,
        noise=0.1,
        schedule="wsd",
        warmup=50,
        eval_every=50,
        examples_per_eval=12,
        anomalies=(
            Anomaly("loss_spike", 300, 4.0),
            Anomaly("lr_zscore", 400),
            Anomaly("grad_norm_nonfinite", 450),
            Anomaly("loss_nonfinite", 500),
            Anomaly("lr_zscore", 600, variant="collapse"),
            Anomaly("accuracy_drop", 700),
            Anomaly("conflicting_labels", 800),
            Anomaly("perfect_answer_high_loss", 850),
            Anomaly("inverted_loss_pattern", 1000),
            Anomaly("divergence_detected", 1200, 150),
        ),
    )
    out = [to_record(r) for r in simulate(spec)]
    return [_with_aux_loss(r) for r in out if r is not None]


def _with_aux_loss(r: Record) -> Record:
    """A second train loss series beside the main one (issue 14), which spikes at 900
    and goes NaN at 950: what series_losses watches."""
    if not isinstance(r, TrainRecord) or r.loss is None:
        return r
    aux = r.loss * 0.5 * (6.0 if r.step == 900 else 1.0)
    return dataclasses.replace(r, raw={**r.raw, "aux_loss": math.nan if r.step == 950 else aux})


def names(triggers: list[list[Trigger]]) -> list[tuple[int, str, str]]:
    return [(t.step, t.name, t.severity.value) for ts in triggers for t in ts]


@pytest.fixture(scope="module")
def records() -> list[Record]:
    return stream()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_resume_from_json_state_gives_the_same_triggers(name: str, records: list[Record]) -> None:
    make = REGISTRY[name]
    whole = make(BUSY)
    expected = [whole.update(r) for r in records]
    assert names(expected), f"{name} never fired on the busy stream: the test would prove nothing"
    rng = random.Random(name)
    for cut in sorted(rng.sample(range(1, len(records) - 1), 4)):
        first = make(BUSY)
        got = [first.update(r) for r in records[:cut]]
        resumed: Detector = make(BUSY)
        resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
        got += [resumed.update(r) for r in records[cut:]]
        assert names(got) == names(expected), f"{name} resumed at record {cut}"


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_state_of_an_older_version_loads_with_defaults(name: str) -> None:
    detector = REGISTRY[name](BUSY)
    detector.load_state_dict({})
    detector.update(TrainRecord(1, 1.0, 1e-4, 1.0, {}))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_rewind_then_replay_is_the_run_after_the_restart(name: str, records: list[Record]) -> None:
    """A trainer restarted from checkpoint-S re-logs the steps after S: rewinding to S
    and feeding them again must not crash, and loses nothing from before S."""
    detector = REGISTRY[name](BUSY)
    for r in records:
        detector.update(r)
    detector.rewind(700)
    again = [detector.update(r) for r in records if r.step is not None and r.step > 700]
    assert all(t.step > 700 for ts in again for t in ts)
    json.dumps(detector.state_dict())


# -- the seed's examples, with the seed's numbers ---------------------------------------
def train(
    step: int, loss: float | None = None, lr: float | None = None, grad: float | None = None
) -> TrainRecord:
    return TrainRecord(step, loss, lr, grad, {})


def feed(detector: Detector, records: list[Record]) -> list[Trigger]:
    return [t for r in records for t in detector.update(r)]


def test_seed_example_loss_zscore_above_40() -> None:
    window = [0.72, 0.71, 0.73, 0.70, 0.72, 0.71, 0.73, 0.72]
    d = LossZScore(LossZScoreConfig(window=8, warmup=8))
    assert not feed(d, [train(i, v) for i, v in enumerate(window)])
    (t,) = d.update(train(8, 1.15))
    assert t.kind == "loss_zscore" and t.details["z"] > 40 and t.name == "loss_zscore_44.67"
    assert t.severity is Severity.WARNING, "one spike, maybe one bad batch"
    held = [d.update(train(9 + i, 1.15))[0].severity for i in range(4)]
    assert held == [Severity.WARNING] * 3 + [Severity.CRITICAL], "it did not come back"


def test_seed_example_loss_spike_87_3pct() -> None:
    d = LossSpike(LossSpikeConfig(window=4, warmup=4, threshold_pct=50.0))
    feed(d, [train(i, v) for i, v in enumerate([1.0, 1.02, 0.98, 1.0])])
    assert [t.name for t in d.update(train(4, 1.873))] == ["loss_spike_87.3pct"]


@pytest.mark.parametrize(
    ("lr", "name"),
    [(2e-4 * (1 + 35.7 * 0.05), "lr_zscore_35.70"), (2e-4 * (1 - 3.21 * 0.05), "lr_zscore_-3.21")],
)
def test_seed_example_lr_zscore_names(lr: float, name: str) -> None:
    d = LrZScore(LrZScoreConfig(threshold=3.0, planned_drop=1.0))  # no drop is planned
    feed(d, [train(s, lr=2e-4) for s in range(1, 30)])
    assert [t.name for t in d.update(train(30, lr=lr))] == [name]


@pytest.mark.parametrize(
    ("lrs", "reason"),
    [
        ([20.0] * 12 + [5.0, 5.0, 1.25], "decay"),  # plateau cuts, x0.25, that hold
        ([3e-6] * 12 + [2e-6, 1e-6, 0.0], "precision"),  # llm.c's 6 decimals, end of decay
    ],
)
def test_planned_lr_changes_are_notes_not_alarms(lrs: list[float], reason: str) -> None:
    d = LrZScore(LrZScoreConfig())
    assert not feed(d, [train(200 * (i + 1), lr=v) for i, v in enumerate(lrs)])
    assert d.notes and {n.event for n in d.notes} == {"LR changed"}
    assert d.notes[-1].fields["reason"] == reason and d.notes[-1].fields["value"] == lrs[-1]


@pytest.mark.parametrize(("schedule", "fired"), [("decay", ["critical"]), ("cyclic", [])])
def test_lr_rise_after_the_peak_is_critical_unless_cyclic(schedule: str, fired: list[str]) -> None:
    """A warm restart (back up to the peak) is a scheduler reset on resume in a decaying
    schedule, the plan in a cyclic one; a x100 jump is critical in both."""
    d = LrZScore(LrZScoreConfig(schedule=schedule))  # type: ignore[arg-type]
    decay = [1e-3 * (1 - i / 100) for i in range(60)]
    assert not feed(d, [train(i + 1, lr=v) for i, v in enumerate(decay)])
    assert [t.severity.value for t in d.update(train(61, lr=1e-3))] == fired
    assert [t.severity.value for t in d.update(train(62, lr=0.1))] == ["critical"]


def test_seed_examples_of_evaluation_and_predictions() -> None:
    best = BestModel(BestModelConfig())
    feed(best, [EvalRecord(500, 0.90, None, {})])
    assert [t.name for t in best.update(EvalRecord(1000, 0.6234, None, {}))] == [
        "best_model_loss_0.6234"
    ]
    drop = AccuracyDrop(AccuracyDropConfig())
    feed(drop, [EvalRecord(1, None, 0.80, {})])
    assert [t.name for t in drop.update(EvalRecord(2, None, 0.677, {}))] == [
        "accuracy_drop_12.3pct"
    ]
    outliers = PredictionOutliers(PredictionsConfig())
    assert outliers.update(ExampleRecord(7, "q", "a", "a", True, 2.34, {}))[0].name == (
        "perfect_answer_high_loss_2.34"
    )
    assert outliers.update(ExampleRecord(7, "q", "a", "b", False, 0.12, {}))[0].name == (
        "wrong_answer_low_loss_0.12"
    )


def test_seed_example_contract_perfect_answer_among_normal_ones() -> None:
    """The contract check's case: 2.4 among right answers at 0.3 and wrong ones at 1.5."""
    d = PredictionOutliers(PredictionsConfig())
    normal = [
        ExampleRecord(2750, f"q{e}", "a", "a" if e < 7 else "b", e < 7, 0.3 if e < 7 else 1.5, {})
        for e in range(1, 10)
    ]
    assert not feed(d, normal)
    assert d.update(ExampleRecord(2750, "q0", "a", "a", True, 2.4, {}))[0].name.startswith(
        "perfect_answer_high_loss_"
    )


def test_seed_example_inverted_pattern_needs_a_significant_test() -> None:
    d = InvertedLossPattern(PredictionsConfig())
    few = [
        ExampleRecord(
            1, f"q{i}", "a", "a" if i % 2 else "b", bool(i % 2), 2.0 if i % 2 else 0.2, {}
        )
        for i in range(8)
    ]
    assert not feed(d, few), "four of each is two small means, not evidence"
    many = [
        ExampleRecord(
            2,
            f"q{i}",
            "a",
            "a" if i % 2 else "b",
            bool(i % 2),
            2.0 + 0.01 * i if i % 2 else 0.2 + 0.01 * i,
            {},
        )
        for i in range(40)
    ]
    (t,) = feed(d, many)
    assert t.name == "inverted_loss_pattern_correct_high" and t.severity is Severity.CRITICAL
    assert t.details["p_value"] < 1e-4


def test_nan_grad_norm_with_finite_loss_is_grad_norm_nonfinite() -> None:
    d = NonFinite(NonFiniteConfig())
    (t,) = d.update(train(10, 0.7, 1e-4, math.nan))
    assert (t.name, t.severity) == ("grad_norm_nonfinite", Severity.WARNING)
    (t,) = d.update(train(20, 0.7, 1e-4, math.inf))
    assert t.severity is Severity.CRITICAL, "a repeat within grad_norm_repeat_steps"
    kinds = [t.kind for t in d.update(train(500, math.nan, 1e-4, math.nan))]
    assert kinds == ["loss_nonfinite", "grad_norm_nonfinite"]


# -- named behaviours: each once a bug or a false alarm ---------------------------------
def test_flat_loss_gives_a_finite_z() -> None:
    d = LossZScore(LossZScoreConfig(window=8, warmup=8))
    feed(d, [train(i, 0.5) for i in range(8)])
    (t,) = d.update(train(8, 0.9))
    assert math.isfinite(t.details["z"])


def test_a_level_shift_is_relearnt_not_an_endless_alarm() -> None:
    d = LossZScore(LossZScoreConfig(window=20, warmup=10, relearn=5))
    feed(d, [train(i, 1.0 + 0.01 * (i % 3)) for i in range(30)])
    fired = feed(d, [train(i, 2.0 + 0.01 * (i % 3)) for i in range(30, 60)])
    assert 1 <= len(fired) <= 5


def test_loss_falling_is_no_alarm_by_default_but_can_be() -> None:
    series = [train(i, 1.0 + 0.01 * (i % 3)) for i in range(30)] + [train(30, 0.5)]
    assert not feed(LossZScore(LossZScoreConfig(window=20, warmup=10)), series)
    both = LossZScore(LossZScoreConfig(window=20, warmup=10, direction="both"))
    assert feed(both, series)[0].details["z"] < 0


def test_near_zero_loss_doubling_is_not_a_spike() -> None:
    """Memorised runs log 0.0001 -> 0.0002 at 4-decimal rounding (a real run does)."""
    start = [train(i, 2.0 - 0.1 * i) for i in range(10)]
    tail = [train(10 + i, 0.0001) for i in range(30)] + [train(40, 0.0004)]
    for d in (LossSpike(LossSpikeConfig()), LossZScore(LossZScoreConfig())):
        assert not feed(d, start + tail)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
@pytest.mark.parametrize("logging", [1, 10])
def test_planned_lr_schedules_never_fire(schedule: Any, logging: int) -> None:
    for warmup in (10, 100, 500):
        spec = RunSpec(
            steps=4000, schedule=schedule, warmup=warmup, logging_steps=logging, eval_every=0
        )
        d = LrZScore(LrZScoreConfig())
        lrs = [train(r["step"], lr=r["learning_rate"]) for r in simulate(spec)]
        assert not feed(d, lrs), (schedule, warmup)


def test_hf_linear_warmup_then_decay_from_zero_is_no_alarm() -> None:
    """A real run (Viettel, logs every step): LR 0 at step 1, warm-up 10 steps, linear
    decay; the old detector fired on every record after the kink."""
    lrs = [train(1, lr=0.0)] + [train(s, lr=2e-5 * (s - 1)) for s in range(2, 12)]
    lrs += [train(s, lr=2e-4 * (1 - (s - 11) / 1018)) for s in range(12, 1029)]
    assert not feed(LrZScore(LrZScoreConfig()), lrs)


def test_lr_reset_and_collapse_fire_once_each() -> None:
    for variant in ("reset", "collapse"):
        spec = RunSpec(
            steps=3000,
            schedule="cosine",
            eval_every=0,
            anomalies=(Anomaly("lr_zscore", 2000, variant=variant),),
        )
        d = LrZScore(LrZScoreConfig())
        fired = feed(d, [train(r["step"], lr=r["learning_rate"]) for r in simulate(spec)])
        assert [t.step for t in fired] == [2000], variant


def test_divergence_ignores_isolated_spikes_and_fires_once_on_a_trend() -> None:
    d = Divergence(DivergenceConfig())
    base = [train(i, 1.0 + (3.0 if i % 97 == 0 else 0.0)) for i in range(1, 1000)]
    assert not feed(d, base)
    fired = feed(d, [train(i, 1.0 + (i - 1000) / 200) for i in range(1000, 1600)])
    assert [t.kind for t in fired] == ["divergence_detected"]
    assert 1100 < fired[0].step < 1250


def test_conflicting_labels_names_both_answers_and_ignores_case_and_spaces() -> None:
    d = ConflictingLabels(ConflictingLabelsConfig())
    ex = [
        ExampleRecord(s, "capital of France?", g, "Paris", True, 0.1, {})
        for s, g in ((10, "Paris"), (20, " paris "), (30, "Lyon"), (40, "Lyon"))
    ]
    (t,) = feed(d, ex)
    assert (t.step, t.details["answers"], t.details["first_step"]) == (30, ["Paris", "Lyon"], 10)


def test_conflicting_labels_memory_is_bounded() -> None:
    d = ConflictingLabels(ConflictingLabelsConfig(max_prompts=5))
    feed(d, [ExampleRecord(i, f"q{i}", "a", "a", True, 0.1, {}) for i in range(50)])
    assert len(d.prompts) == 5


def test_a_loss_that_starts_at_zero_never_alarms() -> None:
    """RL policy losses are about 0 by construction (a real run logs 0.0 and -0.0 for its
    first hundred steps, then values of 1e-4): no z of 1e8 from a zero std."""
    series = [train(i, 0.0) for i in range(60)] + [train(60, 0.0001), train(61, 0.0005)]
    assert not feed(LossZScore(LossZScoreConfig()), series)
    assert not feed(LossSpike(LossSpikeConfig()), series)


def test_divergence_is_no_lucky_stretch_of_a_heavy_tailed_loss() -> None:
    """A fine-tune's per-step loss with heavy tails (lucky batches near 0, hard ones at
    3x) has a noisy rolling median; its lowest stretch is no baseline (dev-tb T18 fired
    four criticals on a falling run). A level that truly doubles still fires."""
    rng = np.random.default_rng(7)

    def fired(levels: list[float]) -> list[int]:
        d = Divergence(DivergenceConfig())
        noise = rng.lognormal(0.0, 0.8, len(levels))
        return [t.step for i, (lv, z) in enumerate(zip(levels, noise, strict=True))
                for t in d.update(TrainRecord(i, lv * z, None, None, {}))]

    assert fired([0.2] * 3000) == []
    assert fired([0.2] * 1500 + [0.5] * 500) != []
