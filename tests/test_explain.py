"""What a snapshot means and what to do: an entry for every trigger the detectors can
produce (walked from the registry, not listed by hand), and ``show`` on snapshots of the
real dev runs, with the figures of each snapshot and the pinned folder to roll back to."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from conftest import make_checkpoint
from test_detectors import BUSY, stream
from test_listing import sm

from smart_monitor.config import load_config
from smart_monitor.detectors import REGISTRY
from smart_monitor.explain import explain
from smart_monitor.meanings import ENTRIES, family_of, lookup
from smart_monitor.outputs.log import make_logger
from smart_monitor.outputs.snapshot import SnapshotWriter, write_metadata
from smart_monitor.runtime.replay import replay
from smart_monitor.triggers import KINDS

SHARED = Path(__file__).parents[1].parent / "shared"
DEV = SHARED / "real-runs" / "dev"
NLPIA2 = "pypi-data__pypi-mirror-359__nlpia2"
EPOCH = 2983  # the nlpia2 logs' steps per epoch (dev/README.md): a checkpoint per epoch


# -- every trigger has an entry --------------------------------------------------------
@pytest.fixture(scope="module")
def produced() -> set[tuple[str, str]]:
    """(kind, name) of every trigger every registered detector fires on a busy run."""
    records = stream()
    out: set[tuple[str, str]] = set()
    for name, make in REGISTRY.items():
        detector = make(BUSY)
        fired = {(t.kind, t.name) for r in records for t in detector.update(r)}
        assert fired, f"detector {name} fired nothing: the walk would not cover it"
        out |= fired
    return out


def _complete(name: str) -> None:
    entry = lookup(name)
    assert entry is not None, f"no entry for trigger {name!r}"
    assert entry.what and entry.causes and entry.checks and entry.action, name
    assert all(entry.causes) and all(entry.checks)
    verdicts = ("stop", "watch", "roll back", "keep", "stop when convenient")
    assert entry.action.split(":")[0] in verdicts


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_has_an_entry(kind: str) -> None:
    _complete(kind)
    assert family_of(kind) == kind


def test_every_name_the_detectors_produce_has_its_kinds_entry(
    produced: set[tuple[str, str]],
) -> None:
    assert {kind for kind, _ in produced} <= KINDS
    for kind, name in produced:
        _complete(name)
        assert family_of(name) == family_of(kind), name
        # the same trigger on another loss series, prefixed with its filename-safe name
        for series in ("val_cls", "train_gen", "val_loss"):
            assert family_of(f"{series}_{name}") == family_of(kind), f"{series}_{name}"


def test_every_name_in_the_contracts_trigger_table_has_an_entry() -> None:
    table = (SHARED / "DESIGN.md").read_text().split("## Triggers", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([^`]+)`(?:, `([^`]+)`)?", table, re.M)
    flat = [n for pair in names for n in pair if n]
    assert len(flat) >= 15
    for name in flat:
        _complete(name)
    assert family_of("overfitting_from_20000") == "overfitting"
    assert family_of("not_learning_500") == "not_learning"
    assert family_of("val_cls_loss_nonfinite") == "loss_nonfinite"
    assert family_of("train_gen_loss_spike_87.3pct") == "loss_spike"


def test_families_are_unique_and_unknown_names_resolve_to_nothing() -> None:
    families = [e.family for e in ENTRIES]
    assert len(families) == len(set(families))
    assert family_of("no_such_trigger_1.0") is None


# -- show on the dev runs --------------------------------------------------------------
def replayed(root: Path, metrics: Path, checkpoints: range) -> Path:
    """``metrics`` replayed with HF-style checkpoints at ``checkpoints``; the snapshot
    folder."""
    run = root / "run"
    run.mkdir(parents=True)
    for step in checkpoints:
        make_checkpoint(run, step)
    out = root / "out"
    config = load_config(
        metrics_file=metrics, checkpoint_dir=run, snapshot_dir=out / "snapshots",
        log_dir=out / "logs", state_dir=out / "state",
    )
    log, daily = make_logger(config.log_dir, stderr=None)
    replay(config, metrics, log, progress=False)
    assert daily is not None
    daily.close()
    return out / "snapshots"


def lr_reset(source: Path, target: Path, at: int) -> Path:
    """The real SFT log with its scheduler reset to the peak LR from step ``at`` on:
    what a resume that does not restore the scheduler state does."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    peak = max(r["learning_rate"] for r in rows if "learning_rate" in r)
    with target.open("w") as fh:
        for r in rows:
            if r.get("step", 0) >= at and "learning_rate" in r:
                r["learning_rate"] = peak
            fh.write(json.dumps(r) + "\n")
    return target


def find(snapshots: Path, kind: str, pick: int = 0) -> tuple[Path, dict[str, Any]]:
    """The snapshot of ``kind`` (the ``pick``-th by step) and its metadata."""
    found = sorted(
        ((p, json.loads((p / "metadata.json").read_text())) for p in snapshots.iterdir()),
        key=lambda pm: int(pm[1]["step"]),
    )
    found = [(p, m) for p, m in found if any(family_of(t) == kind for t in m["triggers"])]
    assert found, f"no {kind} snapshot in {snapshots}"
    return found[pick]


def sections(out: str) -> tuple[str, str]:
    """The two sections ``show`` prints, each joined into one line (text is wrapped)."""
    rest = out.split("\nWhat it means:\n", 1)[1]
    meaning, todo = rest.split("\nWhat to do:\n", 1)
    return " ".join(meaning.split()), " ".join(todo.split())


def numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text)]


def shows(figure: Any, text: str) -> bool:
    """``figure`` (a metadata value) appears in ``text`` to the 4 digits shown."""
    value = float(figure)
    if not math.isfinite(value):
        return "NaN" in text or "inf" in text
    return any(math.isclose(n, value, rel_tol=1e-3) for n in numbers(text))


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """One snapshot of each case the issue names, from real dev runs."""
    root = tmp_path_factory.mktemp("explain")
    epochs = range(EPOCH, 12 * EPOCH + 1, EPOCH)
    nan = replayed(root / "nan", DEV / f"{NLPIA2}_RNN_RELU_2l_12ep.jsonl", epochs)
    gru = replayed(root / "gru", DEV / f"{NLPIA2}_GRU_10ep.jsonl", epochs)
    sft = DEV / "xueh88401-web__qwen2.5-7b-medical-finetune__trainer_log.jsonl"
    lr = replayed(root / "lr", lr_reset(sft, root / "lr_reset.jsonl", 5000), range(500, 7001, 500))
    best = find(gru, "best_model_loss", -1)  # the newest: eval loss 5.35 at step 8949
    return {
        "nan": find(nan, "loss_nonfinite"),
        "divergence": find(gru, "loss_zscore"),
        "stays_up": find(gru, "loss_zscore", -1),  # the README's example
        "lr": find(lr, "lr_zscore"),
        "best": best,
        "overfitting": overfitting_snapshot(root / "overfit", best[0]),
    }


def overfitting_snapshot(root: Path, best: Path) -> tuple[Path, dict[str, Any]]:
    """The conclusion on the GRU run, written by the real snapshot writer: its eval loss
    never beats its best again (``best``: that best model's snapshot). Built here from
    DESIGN.md's keys (best step, best value, the best model's snapshot): no detector on
    this branch draws the conclusion yet."""
    rows = [json.loads(line) for line in
            (DEV / f"{NLPIA2}_GRU_10ep.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    best_step, best_value = min(evals, key=lambda e: e[1])
    later = [e for e in evals if e[0] > best_step]
    step, value = later[2]
    metadata = {
        "triggers": [f"overfitting_from_{best_step}"], "severity": "warning", "step": step,
        "metrics": {"step": step, "eval_loss": value},
        "overfitting": {"best_step": best_step, "best_value": best_value,
                        "best_snapshot": str(best), "value": value,
                        "evaluations": 3},
    }
    result = SnapshotWriter(root).write(f"overfitting_from_{best_step}", metadata, None)
    return result.path, json.loads((result.path / "metadata.json").read_text())


CASES = ("nan", "divergence", "lr", "best", "overfitting")


@pytest.mark.parametrize("case", CASES)
def test_show_says_what_it_means_and_what_to_do_with_the_snapshots_figures(
    dev: dict[str, tuple[Path, dict[str, Any]]], case: str
) -> None:
    path, meta = dev[case]
    meaning, todo = sections(sm("show", path).stdout)
    step = meta["step"]
    assert f"step {step}" in meaning
    name = meta["triggers"][0]
    details = meta.get("details", {}).get(name, {})
    figures: list[Any] = []
    if case == "divergence":
        figures = [details.get("value"), details.get("mean"), details.get("z")]
    elif case == "lr":  # the new LR and the one before it
        figures = [details.get("value"), [v for s, v in meta["lr_history"] if s < step][-1]]
    elif case == "best":
        figures = [details.get("value")]
    elif case == "overfitting":
        figures = [meta["overfitting"]["best_value"], meta["overfitting"]["best_step"]]
    for figure in figures:
        assert figure is not None and shows(figure, meaning), (case, figure, meaning)
    if case == "nan":
        assert "loss NaN at step 200, no finite loss logged before it" in meaning
    if case in ("nan", "divergence", "lr"):
        lr = meta["metrics"]["learning_rate"]
        assert shows(lr, meaning.split("LR", 1)[1]), meaning
    assert re.search(r"1\. .+ 2\. ", todo) and "Action: " in todo and "Rollback: " in todo
    rollback = todo.split("Rollback: ", 1)[1]
    ck = meta["checkpoint"]
    if case == "overfitting":
        assert str(meta["overfitting"]["best_snapshot"]) + "/model" in rollback
    elif ck is None:
        assert case == "nan"  # the NaN is the run's first record: nothing before it
        assert rollback.startswith("no checkpoint existed before this step")
    else:
        assert f"{path.absolute()}/model" in rollback and ck["name"] in rollback
        assert f'resume_from_checkpoint="{path.absolute()}/model"' in rollback
        assert ck["step"] <= step


@pytest.mark.parametrize("case", CASES)
def test_metadata_holds_the_explanation_the_writer_made(
    dev: dict[str, tuple[Path, dict[str, Any]]], case: str
) -> None:
    path, meta = dev[case]
    block = meta["explanation"]
    assert set(block) == {"meaning", "checks", "action", "rollback"}
    assert block == explain(meta, str(path.absolute())).to_dict()
    assert f"step {meta['step']}" in block["meaning"] and block["checks"]


def test_the_readmes_show_output_is_what_show_prints(
    dev: dict[str, tuple[Path, dict[str, Any]]],
) -> None:
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("$ smart-monitor show ", 1)[1].split("```", 1)[0]
    path, _meta = dev["stays_up"]
    printed = sm("show", path).stdout

    def explanation(text: str) -> str:  # the two sections, the snapshot's path left out
        sections = text[text.index("What it means:"):]
        return re.sub(r'"/[^"]+/model"', '"SNAPSHOT/model"', " ".join(sections.split()))

    assert explanation(block) == explanation(printed)


def test_the_actions_follow_the_run(dev: dict[str, tuple[Path, dict[str, Any]]]) -> None:
    actions = {case: dev[case][1]["explanation"]["action"].split(":")[0] for case in CASES}
    assert actions["nan"] == "stop" and actions["best"] == "keep"
    assert actions["lr"] == "roll back"  # a critical LR jump: the scheduler reset


def test_a_released_snapshot_points_to_the_trainers_checkpoint(
    dev: dict[str, tuple[Path, dict[str, Any]]], tmp_path: Path,
) -> None:
    path, meta = dev["divergence"]
    copy = tmp_path / path.name
    write_metadata_to(copy, {**meta, "released": {"at": "2026-12-07T00:00:00Z",
                                                  "reason": "budget", "bytes": 1}})
    rollback = json.loads((copy / "metadata.json").read_text())["explanation"]["rollback"]
    assert "released" in rollback and meta["checkpoint"]["path"] in rollback
    assert "/model" not in rollback.split("(")[0]


def write_metadata_to(folder: Path, meta: dict[str, Any]) -> None:
    folder.mkdir()
    write_metadata(folder, meta)


def test_a_lightning_checkpoint_rolls_back_with_ckpt_path() -> None:
    meta = {
        "triggers": ["loss_spike_190.0pct"], "severity": "critical", "step": 700,
        "checkpoint": {"name": "epoch=3-step=500.ckpt", "step": 500, "mode": "hardlink"},
        "details": {"loss_spike_190.0pct": {"pct": 190.0, "value": 2.9, "baseline": 1.0}},
    }
    ex = explain(meta, "/snaps/anomaly_x")
    assert 'ckpt_path="/snaps/anomaly_x/model/epoch=3-step=500.ckpt"' in ex.rollback
    assert ex.action.startswith("roll back") and "2.90x its recent median 1.0" in ex.evidence


def test_a_scanned_checkpoint_is_pinned_for_inspection_not_resumed_from() -> None:
    meta = {
        "triggers": ["weights_nonfinite"], "severity": "critical", "step": 500,
        "checkpoint": {"name": "checkpoint-500", "step": 500, "mode": "hardlink"},
        "details": {"weights_nonfinite": {"value": 2, "tensors": 2}},
    }
    ex = explain(meta, "/snaps/anomaly_w")
    assert "2 tensors with NaN/Inf" in ex.evidence and ex.action.startswith("stop")
    assert "resume" not in ex.rollback and "inspect /snaps/anomaly_w/model" in ex.rollback


def test_a_trigger_on_another_series_names_it_and_not_the_main_loss_history() -> None:
    meta = {
        "triggers": ["val_cls_loss_nonfinite"], "severity": "critical", "step": 40,
        "loss_history": [[39, 0.5], [40, 0.49]], "lr_history": [[40, 1e-3]],
        "details": {"val_cls_loss_nonfinite": {"value": "nan"}}, "checkpoint": None,
    }
    ex = explain(meta, "/s")
    assert ex.evidence == (
        "val_cls_loss_nonfinite: loss NaN at step 40; LR unchanged at 0.001; grad norm not logged"
    )
    assert ex.causes == lookup("loss_nonfinite").causes  # type: ignore[union-attr]


def test_the_lr_context_says_where_it_changed() -> None:
    def lr(history: list[list[float]]) -> str:
        meta = {"triggers": ["loss_spike_200.0pct"], "step": 5, "lr_history": history}
        return explain(meta, "/s").evidence.split("; ")[1]

    assert lr([[1, 0.1], [2, 0.1], [5, 0.1]]) == "LR unchanged at 0.1"
    assert lr([[1, 0.1], [3, 0.4], [5, 0.4]]) == "LR 0.4, changed from 0.1 at step 3"
    assert lr([[1, 0.3], [3, 0.2], [5, 0.1]]) == "LR 0.1, 0.3 at step 1"


def test_three_triggers_at_one_step_mean_roll_back() -> None:
    names = ["lr_zscore_35.70", "loss_zscore_12.00", "loss_spike_190.0pct"]
    meta = {"triggers": names, "severity": "critical", "step": 9, "checkpoint": None}
    ex = explain(meta, "/s")
    assert ex.action.startswith("roll back") and ex.what.startswith("Several detectors")
    assert ex.causes == lookup("lr_zscore").causes  # type: ignore[union-attr]  # most serious
    assert ex.evidence.count("at step 9") == 3  # each trigger's figures


def test_odd_metadata_is_explained_not_a_traceback() -> None:
    for meta in ({}, {"triggers": ["weird_thing"]}, {"triggers": ["loss_zscore_3.1"],
                  "details": {"loss_zscore_3.1": {"value": "NaN", "mean": None}},
                  "lr_history": [["x", 1], [1]], "step": "seven"}):
        ex = explain(meta, "/s")
        assert ex.evidence and ex.checks and ex.rollback


def test_explain_command_prints_an_entry_by_name_or_family() -> None:
    out = sm("explain", "val_cls_loss_nonfinite").stdout
    assert out.startswith("val_cls_loss_nonfinite (loss_nonfinite)\nWhat it means:\n")
    assert "What to do:\n  1. " in out and "Action: stop" in out
    assert sm("explain", "loss_spike").stdout.startswith("loss_spike\nWhat it means:\n")
    assert sm("explain", "loss_spike_*").stdout.startswith("loss_spike_* (loss_spike)\n")
    listing = sm("explain").stdout.splitlines()
    assert [line.split()[0] for line in listing] == [e.family for e in ENTRIES]
    done = sm("explain", "nope", check=False)
    assert done.returncode == 1 and "no trigger family matches 'nope'" in done.stderr


def test_docstring_examples() -> None:
    import doctest

    from smart_monitor import explain as explain_module
    from smart_monitor import meanings

    assert doctest.testmod(meanings).failed == 0
    assert doctest.testmod(explain_module).failed == 0


def test_an_overfitting_rollback_names_the_nearest_best_model_kept() -> None:
    """A best too small over the last to get a snapshot of its own (best models are
    thinned): the rollback says which best model it points to."""
    block = {"best_step": 2600, "best_value": 0.515, "best_snapshot": "/s/anomaly_best",
             "best_snapshot_step": 1800}
    meta = {"triggers": ["overfitting_from_2600"], "severity": "warning", "step": 2900,
            "checkpoint": None, "overfitting": block}
    rollback = explain(meta, Path("/s/anomaly_overfitting")).to_dict()["rollback"]
    assert "step 2600" in rollback and "(step 1800)" in rollback
    assert "/s/anomaly_best/model" in rollback
