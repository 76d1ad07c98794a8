"""The table of docs/detection-real-runs.md, made by benchmarks/real_runs_table.py: it
is up to date, and it says what the READMEs of ../shared/real-runs say a careful person
concludes (overfitting, not learning, a quiet normal texture)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from real_runs_table import DOC, README, Row, build, in_doc, items, table

# Clean controls: no warning, no critical, no conclusion.
CLEAN = {
    "AriesChen-UPC__GeoLLM__final.json",
    "Fujump__qlora__output.json",
    "HangerYang__Star__final.json",
    "O5-7__chat_glm2_in4_LIL_prefix__final.json",
    "TheUn4given123jkbkjs__Viettel_Race_2026__final.json",
    "akhmetvaleev-ruslan__bashkir-language-audio2text__final.json",
    "hsc748NLP__NSLLM__final.json",
    "ijinyu1113__Learned-Remasking-Policy-for-dLLM__ckpt2000.json",
    "suzushi-tw__luojiu-7b-base__final.json",
    "syGOAT__Mistral-v0.2-Translator-bf16__final.json",
    "CooperBigFoot__CAMELS-CH__version_17_metrics.jsonl",
    "KellerJordan__modded-nanogpt__2024-10-13_llmc_main.jsonl",
    "KellerJordan__modded-nanogpt__2024-11-14_QuantizedFP4_433c1732.jsonl",
    "openai__parameter-golf__GDN_baseline_seq8192.jsonl",
    "pypi-data__pypi-mirror-359__nlpia2_LSTM_2l_12ep.jsonl",
    "xueh88401-web__qwen2.5-7b-medical-finetune__trainer_log.jsonl",
    "T04_keras_finetune_clean",
    "T05_yolov5_clean",
    "T07_yolov8_clean",
    "T14_lightning_csv_lr_monitor",
    "T15_lightning_csv_wgan",
    "T16_summarywriter_add_scalars",
    "T19_hf_trainer_train_only",
}
# The conclusion each README (or, for the two HF runs, the eval curve) calls for.
CONCLUDED = {
    "Hahaazaza__Neiro__final.json": "overfitting_from_2600",
    "P4P4N1CK__whisper-large-v2-japanese-5k-steps__final.json": "overfitting_from_1000",
    "pypi-data__pypi-mirror-359__nlpia2_RNN_TANH_2l_12ep.jsonl": "not_learning_",
    "aigoncharov__trainer_state_viz__final.json": "overfitting_from_",
    "T01_keras_overfit": "overfitting_from_6",
    "T03_keras_two_fits_one_logdir": "overfitting_from_6",
    "T12_lightning_tft_tensorboard": "overfitting_from_661",
    "T13_lightning_csv_overfit": "overfitting_from_372",
    "T02_keras_never_learns": "not_learning_",  # 18 epochs: concluded at the run's end
}
# Several runs in one folder, each with its conclusion (at each run's end: dev-tb T18's
# runs A and C have two evaluations after their best).
CONCLUDED_RUNS = {
    "T18_hf_trainer_shared_logdir": ("overfitting_from_3125", "overfitting_from_1564"),
}
# Worse evaluations that are no overfitting: the train loss rose with them (T08: the
# validation losses explode while the train box loss drifts up).
NOT_OVERFITTING = {"T08_yolov8_val_inf_nan_collapse"}
KEEP_BEST = 3


@pytest.fixture(scope="module")
def rows() -> dict[str, Row]:
    return {r.name: r for r in build()}


def test_every_real_run_has_a_row_and_a_readme_line() -> None:
    names = [p.name for _, p in items()]
    assert len(names) == 14 + 10 + 5 + 20, len(names)
    assert set(names) == set(README), set(names) ^ set(README)


def test_the_doc_holds_the_table_this_code_makes(rows: dict[str, Row]) -> None:
    ordered = [rows[p.name] for _, p in items()]
    assert in_doc(DOC.read_text()) == table(ordered), "run benchmarks/real_runs_table.py --write"


def test_the_five_healthy_pretraining_logs_raise_nothing(rows: dict[str, Row]) -> None:
    lm = [p.name for folder, p in items() if folder == "dev-lm/"]
    assert len(lm) == 5
    for name in lm:
        row = rows[name]
        assert row.records > 1000
        assert (row.warnings, row.criticals, row.snapshots) == (0, 0, 0), row


@pytest.mark.parametrize("name", sorted(CLEAN))
def test_clean_controls_stay_silent(rows: dict[str, Row], name: str) -> None:
    row = rows[name]
    assert row.records > 0, row  # every item is read (issue 14)
    assert (row.warnings, row.criticals, row.snapshots, row.conclusions) == (0, 0, 0, ()), row


@pytest.mark.parametrize("name", sorted(CONCLUDED))
def test_conclusions_where_the_readmes_draw_them(rows: dict[str, Row], name: str) -> None:
    row = rows[name]
    assert row.records > 0, row
    assert [n for n, _ in row.conclusions if n.startswith(CONCLUDED[name])], row
    assert len(row.conclusions) == 1, "one conclusion per episode"


@pytest.mark.parametrize("name", sorted(CONCLUDED_RUNS))
def test_one_conclusion_per_run_of_a_shared_folder(rows: dict[str, Row], name: str) -> None:
    assert tuple(n for n, _ in rows[name].conclusions) == CONCLUDED_RUNS[name], rows[name]


@pytest.mark.parametrize("name", sorted(NOT_OVERFITTING))
def test_no_overfitting_where_the_train_loss_rose_too(rows: dict[str, Row], name: str) -> None:
    assert not [n for n, _ in rows[name].conclusions if n.startswith("overfitting")]


def test_best_models_are_bounded_everywhere(rows: dict[str, Row]) -> None:
    """Within a burst of improvements the 1st, 2nd, 4th, 8th ... best fire (and the
    last): a replay makes about log2(records) per burst, not one per record (one HF run
    here made 99 of 420 before). In ``run`` the budget keeps the weights of ``keep_best``
    of them alone (tests/test_faults_disk.py, case 31); their metadata stays, as every
    snapshot a ``Created snapshot`` line names does (the contract's check)."""
    for r in rows.values():
        assert r.best_models <= KEEP_BEST + 3 * math.log2(max(r.records, 2)), r
