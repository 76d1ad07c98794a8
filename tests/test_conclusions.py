"""The conclusions a person draws from a run (overfitting, not learning), the run's
texture (a loss blip judged against the run's own blips) and bounded best models, on
real runs from ../shared/real-runs and on small streams; each stateful part resumed from
a JSON round-trip of its state at a random record."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from test_retention import Clock

from smart_monitor.config import (
    BestModelConfig,
    Config,
    NotLearningConfig,
    OverfittingConfig,
    TextureConfig,
)
from smart_monitor.detectors.evaluation import BestModel
from smart_monitor.detectors.not_learning import NotLearning
from smart_monitor.detectors.overfitting import Overfitting
from smart_monitor.detectors.texture import Texture
from smart_monitor.detectors.zscore import LossZScore
from smart_monitor.outputs.log import make_logger
from smart_monitor.outputs.retention import enforce_keep_best
from smart_monitor.outputs.snapshot import SnapshotWriter
from smart_monitor.pipeline import Pipeline
from smart_monitor.records import EvalRecord, Record, SummaryRecord, TrainRecord, to_record
from smart_monitor.sources.checkpoints import Checkpoint
from smart_monitor.triggers import Severity, Trigger, kind_of, stats_label

REAL_RUNS = Path(__file__).parents[1].parent / "shared" / "real-runs"
DEV = REAL_RUNS / "dev"


def jsonl(path: Path) -> list[Record]:
    out = [to_record(json.loads(line)) for line in path.read_text().splitlines()]
    return [r for r in out if r is not None]


def fired(detector: Any, records: list[Record]) -> list[Trigger]:
    return [t for r in records for t in detector.update(r)]


def resumed(make: Any, records: list[Record], seed: int) -> list[Trigger]:
    """Stop at a random record, rebuild from a JSON round-trip of the state, go on."""
    cut = random.Random(seed).randrange(1, len(records))
    first = make()
    out = fired(first, records[:cut])
    second = make()
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    return out + fired(second, records[cut:])


def curve(evals: list[float], train: list[float]) -> list[Record]:
    out: list[Record] = []
    for i, (e, t) in enumerate(zip(evals, train, strict=True)):
        out.append(TrainRecord(i * 100 + 50, t, 1e-4, None, {}))
        out.append(EvalRecord(i * 100 + 100, e, None, {}))
    return out


# -- overfitting ---------------------------------------------------------------------
T13 = [43.43, 43.47, 43.52, 47.30, 54.41, 59.72]  # dev-tb T13 val_loss, epochs 0-5


def test_overfitting_named_for_the_best_step_once_per_episode() -> None:
    """dev-tb T13: best at epoch 0, then +9 %, +25 %, +38 % while train falls."""
    records = curve([*T13, 61.0, 62.0, 63.0], [44.7, 44.0, 42.0, 38.0, 33.0, 30.4, 29, 28, 27])
    (t,) = fired(Overfitting(OverfittingConfig()), records)
    assert (t.name, t.step, t.severity) == ("overfitting_from_100", 600, Severity.WARNING)
    assert t.details["best_value"] == 43.43 and t.details["evaluations_worse"] == 3
    assert kind_of(t.name) == "overfitting" and stats_label("overfitting") == "overfitting_from_*"


def test_a_new_best_ends_the_episode_and_a_second_one_is_news() -> None:
    evals = [*T13, 30.0, 38.0, 46.0, 54.0]
    train = [40.0 - 2.0 * i for i in range(10)]
    names = [t.name for t in fired(Overfitting(OverfittingConfig()), curve(evals, train))]
    assert names == ["overfitting_from_100", "overfitting_from_700"]


def test_no_overfitting_when_the_train_loss_rises_too() -> None:
    """Both going up is a divergence (its own detector), not overfitting."""
    train = [44.7, 44.0, 43.0, 50.0, 60.0, 70.0]
    assert not fired(Overfitting(OverfittingConfig()), curve(T13, train))


def test_an_eval_metric_in_its_direction_when_there_is_no_eval_loss() -> None:
    accs = [0.70, 0.74, 0.75, 0.66, 0.62, 0.60]
    records = [EvalRecord(i * 100, None, a, {}) for i, a in enumerate(accs)]
    (t,) = fired(Overfitting(OverfittingConfig()), records)
    assert (t.name, t.details["best_value"], t.details["source"]) == (
        "overfitting_from_200", 0.75, "accuracy"
    )


def test_no_overfitting_while_the_train_loss_stays_put() -> None:
    """A model whose train loss does not fall barely changes: an eval worse meanwhile is
    noise or a disturbance (dev-tb T06 after its resume with the LR replanned), not a
    model that fits its training data at the cost of generalising."""
    train = [44.0, 44.1, 43.9, 44.0, 44.1, 43.9]
    assert not fired(Overfitting(OverfittingConfig()), curve(T13, train))


def test_train_records_read_before_the_evaluations_are_matched_by_step() -> None:
    """A replay of a Keras folder reads ``train/`` before ``validation/``: the train
    level at an evaluation is the one at its step, not the run's last."""
    records = curve([*T13, 61.0, 62.0, 63.0], [44.7, 44.0, 42.0, 38.0, 33.0, 30.4, 29, 28, 27])
    train = [r for r in records if isinstance(r, TrainRecord)]
    evals = [r for r in records if isinstance(r, EvalRecord)]
    (t,) = fired(Overfitting(OverfittingConfig()), [*train, *evals])
    assert t.name == "overfitting_from_100"
    assert t.details["train_loss_at_best"] > t.details["train_loss_now"] + 5


# dev-tb T18, run A: eval/loss at 3125 (best), 6250, 9375; the train loss falls.
T18_A = curve([0.2626, 0.2680, 0.2986], [0.32, 0.24, 0.19])


def test_overfitting_concluded_when_the_run_ends_before_patience() -> None:
    """Two evaluations after the best, each worse than the one before, the last +14 %:
    patience had nothing left to wait for once the run ended."""
    detector = Overfitting(OverfittingConfig())
    assert not fired(detector, T18_A), "mid-run, patience (3) is not reached"
    (t,) = detector.update(SummaryRecord(9375, {}))
    assert (t.name, t.step, t.details["at_run_end"]) == ("overfitting_from_100", 9375, True)
    assert not detector.update(SummaryRecord(9375, {})), "concluded once"


@pytest.mark.parametrize("evals", [
    [0.2626, 0.2986],  # one evaluation after the best: a blip, maybe
    [0.2626, 0.2986, 0.2700],  # back within the margin at the end
    [0.2626, 0.3200, 0.2650, 0.3300],  # the last beyond it, but one back within, not rising
])
def test_no_conclusion_at_the_end_without_a_sustained_rise(evals: list[float]) -> None:
    detector = Overfitting(OverfittingConfig())
    records = curve(evals, [0.32 - 0.04 * i for i in range(len(evals))])
    assert not fired(detector, [*records, SummaryRecord(9375, {})])


@pytest.mark.parametrize(
    "name",
    ["xueh88401-web__qwen2.5-7b-medical-finetune__trainer_log.jsonl",  # +1.7 %: mild
     "CooperBigFoot__CAMELS-CH__version_17_metrics.jsonl"],  # flat, never improved
)
def test_mild_drift_and_a_flat_eval_are_no_overfitting(name: str) -> None:
    assert not fired(Overfitting(OverfittingConfig()), jsonl(DEV / name))


# -- not learning --------------------------------------------------------------------
RNN_TANH = DEV / "pypi-data__pypi-mirror-359__nlpia2_RNN_TANH_2l_12ep.jsonl"


def test_a_run_broken_from_its_first_record_is_not_learning() -> None:
    """nlpia2 RNN_TANH: 17.7-19.5 for five epochs (worse than a uniform guess)."""
    (t,) = fired(NotLearning(NotLearningConfig()), jsonl(RNN_TANH))
    assert t.name == "not_learning_55" and t.step < 14732, "before the LR cut that saves it"
    assert t.details["reason"] == "loss" and t.details["lowest_level"] > 17
    assert t.details["start_level"] > 17 and t.details["slope_t"] > -3


@pytest.mark.parametrize(
    "name",
    ["pypi-data__pypi-mirror-359__nlpia2_LSTM_2l_12ep.jsonl",
     "KellerJordan__modded-nanogpt__2024-10-13_llmc_main.jsonl",
     "CooperBigFoot__CAMELS-CH__version_17_metrics.jsonl"],
)
def test_runs_that_learned_then_converged_are_never_judged(name: str) -> None:
    detector = NotLearning(NotLearningConfig())
    assert not fired(detector, jsonl(DEV / name))
    assert detector.done, "it learned, early: nothing is judged again"


# dev-tb T02: Keras epoch_loss, epochs 0-17 (no trend: 12.5 at 0, 12.2 at 17).
T02 = [TrainRecord(i, v, None, None, {}) for i, v in enumerate([
    12.49, 16.36, 15.65, 13.19, 12.48, 13.98, 14.12, 14.32, 14.13, 12.43, 13.55, 12.13,
    14.16, 10.50, 15.84, 13.61, 10.59, 12.17])]


def test_a_short_run_that_never_learned_is_concluded_at_its_end() -> None:
    detector = NotLearning(NotLearningConfig())
    assert not fired(detector, T02), "18 records: a run still going may yet learn"
    (t,) = detector.update(SummaryRecord(17, {}))
    assert (t.name, t.details["reason"], t.details["at_run_end"]) == (
        "not_learning_18", "loss", True)
    assert t.details["lowest_level"] > t.details["start_level"] - t.details["needed_drop"]


@pytest.mark.parametrize("losses", [
    [0.72, 0.66, 0.60, 0.55, 0.52, 0.49, 0.47, 0.45, 0.43, 0.42, 0.41, 0.40],  # learned
    [12.49, 16.36, 15.65, 13.19, 12.48, 13.98, 14.12, 14.32, 14.13],  # too short to say
])
def test_no_conclusion_at_the_end_of_a_run_that_learned_or_is_too_short(
    losses: list[float],
) -> None:
    records: list[Record] = [TrainRecord(i, v, None, None, {}) for i, v in enumerate(losses)]
    assert not fired(NotLearning(NotLearningConfig()), [*records, SummaryRecord(99, {})])


def test_a_new_run_in_the_folder_ends_the_old_one_with_its_conclusions() -> None:
    """Run A of dev-tb T18 ends when run B starts over in the same logging folder: its
    overfitting is concluded by its own detectors, before the fresh ones take over."""
    pipeline = Pipeline(Config())
    for record in T18_A:
        pipeline.process(record)
    pipeline.writer_started()
    out = pipeline.process(TrainRecord(10, 0.7, 1e-4, None, {}))
    assert out is not None and out.ended is not None
    assert [t.name for t in out.ended.triggers] == ["overfitting_from_100"]
    assert [n.event for n in out.notes] == ["Run restarted"]
    assert pipeline.end_run() is None, "the new run has nothing to conclude"


def test_a_learning_rate_of_zero_since_the_start() -> None:
    records: list[Record] = [TrainRecord(s, 2.0 + 0.3 * (s % 2), 0.0, None, {}) for s in range(60)]
    (t,) = fired(NotLearning(NotLearningConfig()), records)
    assert t.details["reason"] == "learning_rate" and t.details["max_learning_rate"] == 0.0


def test_an_eval_accuracy_that_never_moved_when_no_train_loss_is_logged() -> None:
    records: list[Record] = [EvalRecord(s, None, 0.5 + 0.002 * (s % 3), {}) for s in range(10)]
    (t,) = fired(NotLearning(NotLearningConfig()), records)
    assert (t.name, t.details["reason"]) == ("not_learning_8", "accuracy")


def test_warm_up_records_do_not_count() -> None:
    """A flat loss while the LR still rises is no verdict; after it, 50 records are."""
    records: list[Record] = [
        TrainRecord(s, 3.0 + 0.2 * (s % 3), 1e-6 * (s + 1), None, {}) for s in range(100)
    ]
    (t,) = fired(NotLearning(NotLearningConfig()), records + [
        TrainRecord(s, 3.0 + 0.2 * (s % 3), 5e-5, None, {}) for s in range(100, 160)
    ])
    assert t.step == 149


# -- texture ---------------------------------------------------------------------------
def test_a_blip_is_a_warning_only_when_large_and_rare_for_the_run() -> None:
    texture = Texture(TextureConfig(min_ratio=1.5, rare_steps=1000))
    texture.start(0)
    seen = [(s, texture.judge(s, 2.0, Severity.WARNING)) for s in (100, 400, 700, 5000)]
    assert [sev.value for _, (sev, _) in seen] == ["warning", "info", "info", "warning"]
    _, details = seen[2][1]
    assert (details["earlier_at_least"], details["return_period_steps"]) == (2, 350.0)
    assert texture.judge(800, 1.3, Severity.WARNING)[0] is Severity.INFO, "small: texture"
    assert texture.judge(900, 1.3, Severity.CRITICAL)[0] is Severity.CRITICAL


def test_dev_lm_blips_are_information_and_each_says_how_often() -> None:
    name = "tyler-romero__nanogpt-speedrun__2dbf7fa6.jsonl"
    pipeline = Pipeline(Config())
    found = []
    for r in jsonl(REAL_RUNS / "dev-lm" / name):
        out = pipeline.process(r)
        found += [t for t in out.triggers if t.kind != "best_model_loss"] if out else []
    assert len(found) >= 9 and {t.severity for t in found} == {Severity.INFO}
    assert not [o for o in found if "texture" not in o.details]
    assert max(t.details["ratio"] for t in found) > 1.55, "the largest blips stay visible"


def test_a_loss_that_stays_up_is_no_texture() -> None:
    d = LossZScore(Config().detectors.loss_zscore)
    series = [TrainRecord(s, 3.0 + 0.01 * (s % 5), None, None, {}) for s in range(40)]
    up = [TrainRecord(40 + s, 3.6, None, None, {}) for s in range(6)]
    severities = [t.severity.value for t in fired(d, series + up)]
    assert severities[:2] == ["info", "warning"], severities
    assert "critical" in severities


def test_texture_resumes_from_json() -> None:
    records = jsonl(REAL_RUNS / "dev-lm" / "tyler-romero__nanogpt-speedrun__2dbf7fa6.jsonl")
    train = [r for r in records if isinstance(r, TrainRecord)][:3500]

    def make() -> LossZScore:
        return LossZScore(Config().detectors.loss_zscore)

    whole = [(t.step, t.severity, t.details.get("earlier_at_least")) for t in fired(make(), train)]
    for seed in range(3):
        got = [(t.step, t.severity, t.details.get("earlier_at_least"))
               for t in resumed(make, train, seed)]
        assert got == whole


@pytest.mark.parametrize(("make", "records"), [
    (lambda: Overfitting(OverfittingConfig()),
     curve([*T13, 30.0, 35.0, 40.0, 45.0], [40.0 - 2.0 * i for i in range(10)])),
    (lambda: Overfitting(OverfittingConfig()), [*T18_A, SummaryRecord(9375, {})]),
    (lambda: NotLearning(NotLearningConfig()), jsonl(RNN_TANH)),
    (lambda: NotLearning(NotLearningConfig()), [*T02, SummaryRecord(17, {})]),
    (lambda: BestModel(BestModelConfig()), curve([1.0 - 0.05 * i for i in range(12)] + [2.0],
                                                  [1.0] * 13)),
])
def test_new_detectors_resume_at_a_random_record(make: Any, records: list[Record]) -> None:
    whole = [(t.name, t.step) for t in fired(make(), records)]
    assert whole
    for seed in range(5):
        assert [(t.name, t.step) for t in resumed(make, records, seed)] == whole


# -- best models -----------------------------------------------------------------------
def test_a_burst_of_improvements_fires_at_powers_of_two_and_at_its_end() -> None:
    evals = [1.0 - 0.05 * i for i in range(12)] + [2.0]  # 11 new bests, then worse
    d = BestModel(BestModelConfig())
    records: list[Record] = [EvalRecord(i * 100, v, None, {}) for i, v in enumerate(evals)]
    got = [t.step for t in fired(d, records)]
    assert got == [100, 200, 400, 800, 1100], "1st, 2nd, 4th, 8th and the last of the burst"


def write(writer: SnapshotWriter, tmp: Path, step: int, trigger: str, **extra: Any) -> Path:
    ck = tmp / "run" / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"x" * 1000)
    meta = {"triggers": [trigger], "severity": "info", "step": step, "key": f"0:{step}", **extra}
    return writer.write(trigger, meta, Checkpoint(ck.name, step, ck)).path


def test_at_most_keep_best_hold_weights_and_the_episode_best_on_top(tmp_path: Path) -> None:
    writer = SnapshotWriter(tmp_path / "snaps", "copy", clock=Clock())  # type: ignore[arg-type]
    log, _ = make_logger(tmp_path / "logs", stderr=None)

    def held() -> list[int]:
        return sorted(m["step"] for p, m in writer.published() if (p / "model").is_dir())

    paths = [write(writer, tmp_path, s, f"best_model_loss_{1 - s / 10:.4f}") for s in range(1, 5)]
    write(writer, tmp_path, 5, "overfitting_from_1",  # its best is older than keep_best
          overfitting={"best_step": 1, "best_snapshot": str(paths[0])})
    enforce_keep_best(writer, 3, log)
    assert held() == [1, 2, 3, 4, 5], "the episode's best keeps its weights on top"
    write(writer, tmp_path, 6, "best_model_loss_0.4000")  # a newer best ends the episode
    enforce_keep_best(writer, 3, log)
    assert held() == [3, 4, 5, 6]
    assert sorted(m["step"] for _, m in writer.published()) == [1, 2, 3, 4, 5, 6]  # metadata stays
    text = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert text.count("reason=superseded") == 2
