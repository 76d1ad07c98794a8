"""The bulk path (Ingest.handle_lines, Pipeline.process_block) against the plain one
(handle_line on every line): the same log events, in the same order, and the same
state, on runs that exercise every detector, restarts and bad lines. (``run`` and
``replay`` both take the bulk path, in the same blocks: tests/test_one_path.py holds
them to exact equality.)"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from synthetic import Anomaly, RunSpec, simulate

from smart_monitor.batch import TrainBlock, rolling_mean_std, rolling_median, train_row, train_rows
from smart_monitor.config import Config
from smart_monitor.outputs.log import make_logger
from smart_monitor.outputs.snapshot import SnapshotWriter
from smart_monitor.runtime.engine import Engine
from smart_monitor.sources.checkpoints import CheckpointIndex
from smart_monitor.stats import Ewma, RollingMedian, RollingWindow

KINDS = ("loss_spike", "lr_zscore", "loss_nonfinite", "grad_norm_nonfinite", "accuracy_drop",
         "perfect_answer_high_loss", "wrong_answer_low_loss", "divergence_detected")  # fmt: skip


def run_lines(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    steps = rng.choice([1500, 3000])
    anomalies = tuple(
        Anomaly(kind, rng.randrange(200, steps - 100), rng.uniform(2.5, 6))
        for kind in rng.sample(KINDS, rng.randint(1, 4))
        if kind != "divergence_detected" or rng.random() < 0.5
    )
    spec = RunSpec(
        steps=steps, seed=seed, noise=rng.choice([0.02, 0.05, 0.15]),
        schedule=rng.choice(["cosine", "linear", "constant", "wsd"]),
        logging_steps=rng.choice([1, 1, 5]), eval_every=rng.choice([0, 250]),
        anomalies=anomalies,
    )  # fmt: skip
    records = list(simulate(spec))
    lines = [json.dumps(r).encode() for r in records]
    if seed % 3 == 0:  # the trainer resumed from an earlier checkpoint and re-logs
        cut = len(lines) * 2 // 3
        lines = lines[:cut] + lines[cut // 2 :]
    if seed % 4 == 1:  # some records without a learning rate, an int loss, bad lines
        for i in rng.sample(range(len(lines)), 40):
            rec = json.loads(lines[i])
            rec.pop("learning_rate", None)
            if "loss" in rec and rng.random() < 0.3:
                rec["loss"] = 1
            lines[i] = json.dumps(rec).encode()
        lines.insert(rng.randrange(len(lines)), b"not json")
        lines.insert(rng.randrange(len(lines)), b'{"step": 5, "loss": "high"}')
        lines.insert(rng.randrange(len(lines)), b"")
    return lines


def engine(tmp: Path) -> tuple[Engine, io.StringIO]:
    out = io.StringIO()
    log, _ = make_logger(None, "json", "debug", stderr=out)
    config = Config(snapshot_dir=tmp / "snapshots", log_dir=tmp / "logs")
    index = CheckpointIndex(None, config.checkpoints)
    return Engine(config, log, index, SnapshotWriter(config.snapshot_dir)), out


def events(out: io.StringIO) -> list[dict[str, Any]]:
    """The events without their times and paths; numbers to 9 significant digits: a
    window absorbed in bulk is summed exactly, the running one by rolling updates, so
    a z-score may differ in its last bits (never in a decision or a trigger name).
    ``Watching series`` is said after the first block read, which the chunking moves."""
    found = []
    for line in out.getvalue().splitlines():
        event = json.loads(line)
        if event["event"] == "Watching series":
            continue
        for key in ("timestamp", "path"):
            event.pop(key, None)
        found.append(rounded(event))
    return found


def rounded(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.9g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v) for v in value]
    return value


@pytest.mark.parametrize("seed", range(12))
def test_bulk_path_equals_line_by_line(tmp_path: Path, seed: int) -> None:
    lines = run_lines(seed)
    plain, plain_out = engine(tmp_path / "plain")
    offset = 0
    for line in lines:
        if line:
            plain.ingest.handle_line(line, offset)
        offset += len(line) + 1
    bulk, bulk_out = engine(tmp_path / "bulk")
    chunk = random.Random(seed).choice([7, 500, 100_000])  # where the chunks end matters
    offset = 0
    for i in range(0, len(lines), chunk):
        part: list[bytes | None] = list(lines[i : i + chunk])
        bulk.ingest.handle_lines(part, offset)
        offset += sum(len(x) + 1 for x in lines[i : i + chunk])
    assert events(bulk_out) == events(plain_out)
    assert any(e["event"] == "Detected anomaly" for e in events(plain_out))
    assert bulk.counts == plain.counts
    state = rounded(json.loads(json.dumps(bulk.pipeline.state_dict())))
    assert state == rounded(json.loads(json.dumps(plain.pipeline.state_dict())))
    assert repr(bulk.pipeline.latest) == repr(plain.pipeline.latest)  # what /metrics shows


def test_oversized_line_in_a_chunk_is_counted_once(tmp_path: Path) -> None:
    bulk, out = engine(tmp_path)
    lines: list[bytes | None] = [b'{"step": 1, "loss": 1.0}', None]
    bulk.ingest.handle_lines(lines, 0)
    assert bulk.counts["records"] == 1 and bulk.counts["malformed"] == 1
    assert [e["reason"] for e in events(out) if e["event"] == "Skipped malformed line"] == [
        "oversized"
    ]


@pytest.mark.parametrize("bad", [
    [b'{"step": 3, "loss": 0.5, "x": [1', b'{"step": 4, "loss": 0.5}'],  # torn, then whole
    [b'{"step": 3, "loss": 0.5}, {"step": 4, "loss": 0.5}'],  # two values on one line
    [b'{"step": 3, "loss": 0.5', b'"step": 4, "loss": 0.5}'],  # one record over two lines
])  # fmt: skip
def test_lines_parsed_together_are_judged_one_by_one(tmp_path: Path, bad: list[bytes]) -> None:
    """A chunk is parsed as one JSON array while it can be (Ingest): a line that is not
    one JSON value must never lend or borrow an element, whatever its neighbours."""
    lines = [b'{"step": %d, "loss": 0.5}' % s for s in (1, 2)] + bad + [b'{"step": 9, "loss": 0.5}']
    plain, plain_out = engine(tmp_path / "plain")
    for line in lines:
        plain.ingest.handle_line(line)
    bulk, bulk_out = engine(tmp_path / "bulk")
    bulk.ingest.handle_lines(list(lines), 0)
    assert bulk.counts == plain.counts and bulk.counts["malformed"] >= 1
    assert [e for e in events(bulk_out) if e["event"] != "Skipped malformed line"] == [
        e for e in events(plain_out) if e["event"] != "Skipped malformed line"]


def test_train_row_refuses_what_the_plain_path_must_judge() -> None:
    blocking = frozenset({"lr", "eval_loss", "prompt"})
    good = {"step": 3, "loss": 0.5, "learning_rate": 1e-4, "grad_norm": 2}
    assert train_row(good, blocking) == (3, 0.5, 1e-4, 2.0, good, 0)
    for bad in (
        {"step": 3, "loss": True},
        {"step": 3, "loss": "x"},
        {"step": 3, "loss": math.inf},
        {"step": 3.0, "loss": 0.5},
        {"step": -1, "loss": 0.5},
        {"step": 3, "lr": 0.1, "loss": 0.5},
        {"step": 3, "eval_loss": 0.5},
        {"step": 3, "epoch": 1.0},
    ):
        assert train_row(bad, blocking) is None, bad
    full = {"step": 3, "loss": 0.5, "learning_rate": 1e-4, "grad_norm": 2.0}
    for key in ("loss", "learning_rate", "grad_norm"):  # the all-float path judges each too
        for value in (math.nan, math.inf, -math.inf, True, "1.0"):
            assert train_row({**full, key: value}, blocking) is None, (key, value)
    assert train_row({**full, "loss": -1e308}, blocking) is None  # past MAX_METRIC
    huge = {**full, "learning_rate": 1e300}  # finite: only the loss has a range
    assert train_row(huge, blocking) == (3, 0.5, 1e300, 2.0, huge, 0)
    # after an HF-shaped record, train_rows takes its four keys at once: the same rows
    hf = {"step": 1, "loss": 0.5, "learning_rate": 1e-4, "grad_norm": 2.0}
    others = [good, huge, {**full, "step": -1}, {**full, "eval_loss": 0.5}, [1], "x", None,
              *({**full, key: value} for key in full for value in (math.nan, True, "1", 7))]
    assert train_rows([hf, *others], blocking) == [train_row(d, blocking) for d in [hf, *others]]


def test_rolling_helpers_match_the_running_statistics() -> None:
    rng = random.Random(1)
    values = [rng.lognormvariate(0, 0.3) for _ in range(400)]
    for size in (5, 20, 25):
        history = values[:size]
        window, median = RollingWindow(size), RollingMedian(size)
        for i, v in enumerate(history):
            window.add(i, v)
            median.add(i, v)
        block = TrainBlock([(i, v, None, None, {}, 6) for i, v in enumerate(values[size:], size)])
        assert block.loss is not None
        means, stds = rolling_mean_std(history, block.loss, size)
        before = rolling_median(history, block.loss, size, include=False)
        after = rolling_median(history, block.loss, size, include=True)
        for j, v in enumerate(values[size:]):
            assert means[j] == pytest.approx(window.mean, rel=1e-12)
            assert stds[j] == pytest.approx(window.std, rel=1e-6, abs=1e-12)
            assert before[j] == median.median  # the same arithmetic, to the bit
            window.add(size + j, v)
            median.add(size + j, v)
            assert after[j] == median.median


@pytest.mark.parametrize("n", [1, 63, 64, 65, 300])
def test_ewma_levels_match_the_running_levels(n: int) -> None:
    rng = random.Random(n)
    values = [rng.lognormvariate(0, 0.5) for _ in range(n)]
    for start in (None, 2.0):  # a first value is its own level; a level before it
        one, bulk = Ewma(0.02, start), Ewma(0.02, start)
        want = [one.add(v) for v in values]
        got = bulk.levels(np.array(values)).tolist()
        assert got == pytest.approx(want, rel=1e-12) and bulk.value == pytest.approx(one.value)


def drive_bulk(detector: Any, block: TrainBlock) -> list[str]:
    """One detector alone on the bulk path: screen, absorb the quiet, update the rest."""
    fired: list[str] = []
    i, n = 0, len(block)
    while i < n:
        end = detector.screen(block, i, n)
        if end - i >= 2:
            detector.absorb(block, i, end - 1)
        last = end + 1 if end < n else end
        for j in range(max(i, end - 1), last):
            fired += [t.name for t in detector.update(block.record(j))]
        i = last
    return fired


def train_blocks(seed: int) -> list[TrainBlock]:
    """Train-only runs with spikes, LR glitches and slow divergence, cut into blocks."""
    rng = random.Random(seed)
    spec = RunSpec(
        steps=2500, seed=seed, noise=rng.choice([0.02, 0.1]), eval_every=0,
        schedule=rng.choice(["cosine", "constant", "wsd"]), logging_steps=rng.choice([1, 5]),
        anomalies=(Anomaly("loss_spike", 700, 4.0), Anomaly("lr_zscore", 1300, 3.0),
                   Anomaly("divergence_detected", 1900)),
    )  # fmt: skip
    rows = [r for r in (train_row(rec, frozenset()) for rec in simulate(spec)) if r is not None]
    cut = rng.randrange(50, len(rows) - 50)
    return [TrainBlock(rows[:cut]), TrainBlock(rows[cut:])]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("sensitive", [False, True])
def test_each_screen_alone_misses_nothing(seed: int, sensitive: bool) -> None:
    """Every detector by itself: screening can only skip what update would not fire on.
    ``sensitive`` lowers the thresholds so that detections, and near misses, abound."""
    from smart_monitor.config import DetectorsConfig
    from smart_monitor.detectors import build_detectors

    config = DetectorsConfig()
    if sensitive:
        config = DetectorsConfig.model_validate({
            "loss_zscore": {"threshold": 2.0, "min_rise": 0.0},
            "lr_zscore": {"threshold": 2.0},
            "loss_spike": {"threshold_pct": 5.0, "min_rise": 0.0, "min_robust_z": 1.0},
            "divergence": {"factor": 1.05, "min_rise": 0.0, "patience": 2},
            "best_model": {"train_min_steps": 10, "min_rel_delta": 0.0},
        })  # fmt: skip
    blocks = train_blocks(seed)
    plain_detectors = build_detectors(config)
    bulk_detectors = build_detectors(config)
    for name, plain in plain_detectors.items():
        bulk = bulk_detectors[name]
        want: list[str] = []
        got: list[str] = []
        for block in blocks:
            want += [t.name for j in range(len(block)) for t in plain.update(block.record(j))]
            got += drive_bulk(bulk, block)
        assert got == want, name
        assert rounded(bulk.state_dict()) == rounded(plain.state_dict()), name
        if sensitive and name in ("loss_zscore", "lr_zscore", "loss_spike", "divergence"):
            assert want, f"{name} never fired: the test would not see a missed candidate"
