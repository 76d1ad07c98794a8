"""Every real run in ../shared/real-runs through the pipeline with the default config:
the alarms are exactly the ones docs/detection.md explains."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from smart_monitor.config import Config
from smart_monitor.pipeline import Pipeline
from smart_monitor.records import DEFAULT_ALIASES, to_record
from smart_monitor.series import SeriesBook
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
    # memorises its data (train loss to 2e-4) while the eval loss rises from its best,
    # 0.515 at step 2600, to 0.92: overfitting (docs/detection-real-runs.md)
    "Hahaazaza__Neiro__final.json": [("overfitting_from_2600", 2900)],
    # eval loss 0.321 at 1000, then 0.358, 0.394, 0.412, 0.420 while the train loss goes
    # to 0.0002 (the WER still improves a little: the warning says what the loss does)
    "P4P4N1CK__whisper-large-v2-japanese-5k-steps__final.json": [("overfitting_from_1000", 5000)],
    # evaluated on six sets under their own names (eval_g0_loss ...): the main one,
    # eval_g0_loss (the first seen), is best at step 401, then rises every evaluation;
    # the other sets' losses are series of their own, never the main eval loss (read
    # as one, they made it jump between sets and concluded at 1203 from their mixture)
    "aigoncharov__trainer_state_viz__final.json": [("overfitting_from_401", 2005)],
}


def alarms(path: Path) -> tuple[list[tuple[str, int]], int]:
    history = trainer_state_history(path)
    assert history is not None, f"{path.name} is not a trainer_state.json"
    pipeline = Pipeline(Config())
    book = SeriesBook({})  # the run's main series, as the ingest decides them
    out, best = [], 0
    for entry in history:
        record = to_record(entry, DEFAULT_ALIASES, book.is_main)
        outcome = pipeline.process(record) if record is not None else None
        for t in outcome.triggers if outcome is not None else ():
            if t.kind == "best_model_loss":
                best += 1
            elif t.severity.value != "info":  # info: the run's texture (detectors/texture.py)
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


# -- the development set: real logs as metrics JSONL, replayed by the real command ----
DEV = REAL_RUNS / "dev"
DEV_FILES = sorted(DEV.glob("*.jsonl"))
_LINE = re.compile(r"^\S+ (\w+) (.+?)(?: (\w+=.*))?$")


@dataclass(frozen=True)
class Expect:
    """What dev/README.md says a careful human wants from one log: ``alarms`` are
    ``(first step, last step, severity)`` windows the logged alarms fall in, in order
    (empty: a clean run); ``events``: other log events at their steps."""

    alarms: tuple[tuple[int, int, str], ...] = ()
    events: tuple[tuple[str, int], ...] = ()
    max_snapshots: int = 0
    max_lines: int = 80  # Started, best models (info), Stopped


SPIKY = Expect(max_snapshots=3, max_lines=200)  # one-batch spikes: see test below
# the spikes of QuantizedFP4 (at most 1.56x) are the texture of dev-lm's healthy runs
# (up to 1.61x there): information, each seen, none a warning (detectors/texture.py)
TEXTURE = Expect(max_lines=200)
DEV_EXPECTED = {
    "KellerJordan__modded-nanogpt__2024-11-10_ScaleShortcuts_4897c987.jsonl": SPIKY,
    "KellerJordan__modded-nanogpt__2024-11-14_QuantizedFP4_433c1732.jsonl": TEXTURE,
    "KellerJordan__modded-nanogpt__2024-10-13_llmc_main.jsonl": Expect(
        events=(("LR changed", 18785), ("LR changed", 18960), ("LR changed", 19214)),
    ),
    "pypi-data__pypi-mirror-359__nlpia2_RNN_RELU_2l_12ep.jsonl": Expect(
        alarms=((200, 200, "critical"),),
        events=(("LR changed", 6166), ("LR changed", 33013)),
        max_snapshots=1, max_lines=50,
    ),
    "pypi-data__pypi-mirror-359__nlpia2_GRU_10ep.jsonl": Expect(
        alarms=((10349, 10549, "warning"), (10549, 12132, "critical")),
        events=(("LR changed", 12132), ("LR changed", 27047)),
        max_snapshots=2,
    ),
    "pypi-data__pypi-mirror-359__nlpia2_RNN_TANH_2l_12ep.jsonl": Expect(
        # not_learning: flat above ln(vocabulary) from the start, before the LR cut at 14732
        alarms=((200, 14732, "warning"),),
        events=(("LR changed", 15115), ("LR changed", 27047), ("LR changed", 33013)),
        max_snapshots=1,
    ),
    "pypi-data__pypi-mirror-359__nlpia2_LSTM_2l_12ep.jsonl": Expect(
        events=(("LR changed", 27047),),
    ),
    "openai__parameter-golf__GDN_baseline_seq8192.jsonl": Expect(events=(("Run restarted", 1),)),
    "xueh88401-web__qwen2.5-7b-medical-finetune__trainer_log.jsonl": Expect(),
    "CooperBigFoot__CAMELS-CH__version_17_metrics.jsonl": Expect(),
}
# dev/README.md: the one-batch spikes a person sees, each back on trend the next step
README_SPIKES = {
    "KellerJordan__modded-nanogpt__2024-11-10_ScaleShortcuts_4897c987.jsonl": (
        14221, 17387, 13677, 18527, 10270, 7617, 15356, 947, 5335,
    ),
    "KellerJordan__modded-nanogpt__2024-11-14_QuantizedFP4_433c1732.jsonl": (2263, 2906, 524),
}


def replayed(path: Path, out: Path) -> list[tuple[str, str, dict[str, str]]]:
    """``smart-monitor replay`` with the default config: its log as (level, event,
    fields) triples."""
    subprocess.run(
        [sys.executable, "-m", "smart_monitor", "replay", "--no-plots", "--output", str(out),
         "--metrics", str(path)],
        capture_output=True, check=True,
    )
    found = []
    for p in sorted((out / "logs").glob("*.log")):
        for line in p.read_text().splitlines():
            m = _LINE.match(line)
            assert m, line
            fields = dict(t.split("=", 1) for t in (m[3] or "").split(" ") if "=" in t)
            found.append((m[1], m[2], fields))
    return found


def test_the_dev_runs_are_there() -> None:
    assert {p.name for p in DEV_FILES} == set(DEV_EXPECTED), f"expected the dev set in {DEV}"


@pytest.mark.parametrize("path", DEV_FILES, ids=[p.stem.split("__")[-1] for p in DEV_FILES])
def test_dev_run_alarms_events_snapshots_and_log_lines(path: Path, tmp_path: Path) -> None:
    expect = DEV_EXPECTED[path.name]
    log = replayed(path, tmp_path)
    alarms = [
        (int(f["step"]), level) for level, event, f in log
        if event == "Detected anomaly" and level != "info"
    ]
    assert len(alarms) == len(expect.alarms) or expect is SPIKY, alarms
    for (step, level), (lo, hi, severity) in zip(alarms, expect.alarms, strict=False):
        assert lo <= step <= hi and level == severity, (alarms, expect.alarms)
    if expect is SPIKY:
        assert alarms and all(level == "warning" for _, level in alarms), alarms
    for event, step in expect.events:
        assert any(e == event and f.get("step") == str(step) for _, e, f in log), (event, step)
    assert not any(e == "Trainer restarted" for _, e, _ in log)
    snapshots = [
        f for _, e, f in log if e == "Created snapshot" and "best_model" not in f["triggers"]
    ]
    assert len(snapshots) <= expect.max_snapshots, snapshots
    assert len(log) <= expect.max_lines, len(log)


@pytest.mark.parametrize("name", sorted(README_SPIKES), ids=["ScaleShortcuts", "QuantizedFP4"])
def test_one_batch_spikes_are_each_seen_and_counted(name: str) -> None:
    """Every spike the README names is a detection (counted in ``stats`` even when the
    log sums it up), a warning: each came back on trend at once."""
    pipeline = Pipeline(Config())
    found: dict[int, str] = {}
    for line in (DEV / name).read_text().splitlines():
        record = to_record(json.loads(line))
        outcome = pipeline.process(record) if record is not None else None
        for t in outcome.triggers if outcome is not None else ():
            if t.kind != "best_model_loss":
                found[t.step] = t.severity.value
    missed = [s for s in README_SPIKES[name] if s not in found]
    assert len(missed) <= 1, missed  # 5335 (1.38x) sits in a window with a smaller spike
    # a warning only when large and rare for the run, else the run's texture (info)
    assert set(found.values()) <= {"warning", "info"}, found
    largest = {"KellerJordan__modded-nanogpt__2024-11-10_ScaleShortcuts_4897c987.jsonl": 14221}
    if name in largest:
        assert found[largest[name]] == "warning", "a 1.8x blip, larger than any before"


def test_a_16000_record_nan_run_is_one_snapshot_in_a_few_lines(tmp_path: Path) -> None:
    """The pattern real NaN runs show (loss and grad norm NaN for good): one incident,
    one snapshot, `Incident ongoing` at 10, 100, 1,000, 10,000 detections, every
    detection counted."""
    path = tmp_path / "nan.jsonl"
    with open(path, "w") as fh:
        for step in range(1, 16001):
            bad = step > 200
            loss = math.nan if bad else 2.0 - step * 1e-3
            fh.write(json.dumps({"step": step, "loss": loss, "learning_rate": 1e-4,
                                 "grad_norm": math.nan if bad else 1.0}) + "\n")
    log = replayed(path, tmp_path / "out")
    assert len(log) < 50, len(log)
    assert [f["detections"] for _, e, f in log if e == "Incident ongoing"] == [
        "10", "100", "1000", "10000"
    ]
    assert sum(e == "Created snapshot" for _, e, _ in log) == 1
    assert log[-1][2]["detections"] == str(2 * 15800)


def test_quiet_detections_still_count_in_prometheus(tmp_path: Path) -> None:
    """nlpia2 RNN_RELU (NaN in all 168 train records): one `Detected anomaly` line, and
    the `/metrics` counter of a real HTTP scrape counts all 168 detections."""
    from test_metrics import scrape

    from smart_monitor.hooks.metrics import MetricsServer
    from smart_monitor.outputs.log import make_logger
    from smart_monitor.outputs.snapshot import SnapshotWriter
    from smart_monitor.runtime.engine import Engine
    from smart_monitor.sources.checkpoints import CheckpointIndex

    config = Config(snapshot_dir=tmp_path / "snaps", log_dir=tmp_path / "logs")
    log, _ = make_logger(config.log_dir, stderr=None)
    engine = Engine(config, log, CheckpointIndex(None, config.checkpoints),
                    SnapshotWriter(config.snapshot_dir))
    server = MetricsServer(engine, config)
    engine.listeners.append(server)
    port = server.start()
    try:
        data = (DEV / "pypi-data__pypi-mirror-359__nlpia2_RNN_RELU_2l_12ep.jsonl").read_bytes()
        for line in data.splitlines():  # one line a read, as a daemon following the trainer
            engine.ingest.handle_lines([line], 0)
        counts = scrape(port)
    finally:
        server.stop()
    crit = (("severity", "critical"), ("trigger", "loss_nonfinite"))
    assert counts[("smart_monitor_detections_total", crit)] == 168
    text = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert text.count("Detected anomaly step=") == 1
