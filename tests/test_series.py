"""Series and roles (issue 14): the one rule, the series watched beside the main loss,
``No loss series``, FAULTS.md case 61, and CSV/JSONL with tensorboard not installed."""

from __future__ import annotations

import math
import os
import re
import subprocess
from pathlib import Path

import pytest
from live_harness import SMART_MONITOR

from smart_monitor.config import DetectorsConfig
from smart_monitor.detectors.series import SeriesLosses
from smart_monitor.records import EvalRecord, TrainRecord
from smart_monitor.series import SeriesBook, classify, qualified


@pytest.mark.parametrize(
    ("name", "role", "split", "direction"),
    [
        ("loss", "loss", "train", "lower"),
        ("train_loss_step", "loss", "train", "lower"),
        ("train_loss_epoch", "aggregate", "train", None),
        ("epoch_loss", "loss", "train", "lower"),
        ("train/box_loss", "loss", "train", "lower"),
        ("total_loss", "loss", "train", "lower"),
        ("Loss/train", "loss", "train", "lower"),
        ("train loss", "loss", "train", "lower"),
        ("train_gen_loss", "loss", "train", "lower"),
        ("val/cls_loss", "loss", "eval", "lower"),
        ("validation/epoch_loss", "loss", "eval", "lower"),
        ("test_loss", "loss", "eval", "lower"),
        ("lr", "learning_rate", "train", None),
        ("lr-AdamW", "learning_rate", "train", None),
        ("lr/pg0", "learning_rate", "train", None),
        ("x/lr0", "learning_rate", "train", None),
        ("train/grad_norm", "grad_norm", "train", None),
        ("metrics/mAP50(B)", "metric", "eval", "higher"),
        ("val_accuracy", "metric", "eval", "higher"),
        ("train/epoch_accuracy", "metric", "train", "higher"),
        ("eval_wer", "metric", "eval", "lower"),
        ("val_RMSE", "metric", "eval", "lower"),
        ("perplexity", "metric", "eval", "lower"),
        ("epoch", "other", "train", None),
        ("hp_metric", "other", "train", None),
        ("iteration", "step", "train", None),
    ],
)
def test_the_role_rule(name: str, role: str, split: str, direction: str | None) -> None:
    s = classify(name)
    assert (s.role, s.split, s.direction) == (role, split, direction)


def test_folders_name_series_as_the_writers_meant() -> None:
    assert qualified("loss", "simple_lr/loss_training") == "loss_training"  # add_scalars
    assert qualified("epoch_loss", "logs/validation") == "validation/epoch_loss"  # Keras
    assert qualified("val/box_loss", "detect/train") == "val/box_loss"  # a run named train


def test_the_plainest_loss_is_main_and_a_plainer_one_later_takes_over() -> None:
    book = SeriesBook({})
    assert [book.key(t) for t in ("train/box_loss", "train/cls_loss")] == ["loss", "train/cls_loss"]
    assert book.key("val/cls_loss") == "eval_loss"  # the only eval loss so far
    assert book.key("val/box_loss") == "eval_loss"  # pairs with the main train loss
    assert book.key("val/cls_loss") == "val/cls_loss" and book.version == 1
    chosen = SeriesBook({}, main_loss="my_loss")  # [records] loss: before the rule
    assert [chosen.key(t) for t in ("loss", "my_loss", "loss")] == ["loss", "loss", "loss/series"]


def test_every_loss_series_has_its_own_state_and_prefixed_names() -> None:
    d = SeriesLosses(DetectorsConfig())
    fired = []
    for step in range(40):
        aux = 1.0 + 0.01 * (step % 3) if step != 30 else 9.0
        raw = {"step": step, "loss": 0.5, "train_aux_loss": aux,
               "train_disc_loss": math.nan if step == 35 else 0.7 + 0.5 * (step % 2)}  # fmt: skip
        fired += d.update(TrainRecord(step, 0.5, None, None, raw))
    # the auxiliary loss spikes; the discriminator's jumps are no news (a GAN's losses
    # are not minimised), its NaN is
    assert [(t.step, t.name.split("_spike")[0], t.severity.value) for t in fired] == [
        (30, "train_aux_loss", "warning"), (35, "train_disc_loss_nonfinite", "critical"),
    ]  # fmt: skip


def test_a_nonfinite_eval_loss_is_critical_when_it_persists() -> None:
    d = SeriesLosses(DetectorsConfig())
    assert d.update(EvalRecord(1, 1.0, None, {"eval_loss": 1.0, "mAP50": 0.8})) == []
    nan = {"eval_loss": math.nan, "mAP50": 0.75}
    assert [t.severity.value for t in d.update(EvalRecord(2, math.nan, None, nan))] == ["warning"]
    assert [t.severity.value for t in d.update(EvalRecord(3, math.nan, None, nan))] == ["critical"]


def _replay(path: Path, out: Path, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = subprocess.run(
        [SMART_MONITOR, "replay", "--metrics", str(path), "--output", str(out), "--no-plots",
         "--report"],
        capture_output=True, text=True, timeout=120, check=False, env=env,
    )  # fmt: skip
    log = "".join(p.read_text() for p in sorted((out / "logs").glob("*.log")))
    return proc.returncode, proc.stdout + proc.stderr, log


def test_gan_losses_both_nan_from_step_one_are_caught(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train_gen_loss,train_disc_loss\n"
                   + "".join(f"0,{s},nan,nan\n" for s in range(1, 6)))  # fmt: skip
    code, _, log = _replay(csv, tmp_path / "out")
    assert code == 0
    found = re.findall(r"critical Detected anomaly step=1 trigger=(\S+)", log)
    # no main loss (a GAN's are not minimised): both series non-finite at once are one
    # failed step, named for the first
    assert found == ["train_gen_loss_nonfinite"], log
    assert "train_loss=train_gen_loss,train_disc_loss" in log  # both watched, neither main


def test_no_loss_series_is_said_with_the_fix_and_replay_exits_4(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    rows = "".join(f"{s},{1 / s},0.5\n" for s in range(1, 9))
    csv.write_text("step,my_objective,val_acc\n" + rows)
    code, out, log = _replay(csv, tmp_path / "out")
    assert code == 4, out
    line = next(x for x in log.splitlines() if " No loss series " in x)
    assert line.split()[1] == "warning"
    assert "seen=my_objective,val_acc" in line
    assert re.search(r'fix=.*aliases = \{ \\?"my_objective\\?" = \\?"loss', line), line
    assert re.search(r"^my_objective\s+ignored\s+0\.125", out, re.M)  # --report's series


def test_fault_61_csv_bad_cell_is_malformed_and_the_row_still_read(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    rows = [f"{s},{1.0 - s / 100},0.5\n" for s in range(1, 20)]
    rows[9] = "10,oops,nan\n"  # a bad cell beside a NaN eval loss, in the same row
    rows[12] = "13,0.8\n"  # a short row
    csv.write_text("step,train_loss,val_loss\n" + "".join(rows))
    code, out, log = _replay(csv, tmp_path / "out")
    assert code == 0 and "Traceback" not in out
    malformed = re.findall(r"warning Skipped malformed line reason=(\S+) detail=(.*?) count", log)
    assert [r for r, _ in malformed] == ["bad_cell", "short_row"], log
    assert "train_loss" in malformed[0][1] and "row 10" in malformed[0][1]
    assert "(2 malformed)" in out
    assert re.search(r"Detected anomaly step=10 trigger=eval_loss_nonfinite", log), log


def test_csv_and_jsonl_need_no_tensorboard(tmp_path: Path) -> None:
    shim = tmp_path / "shim" / "tensorboard"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('tensorboard hidden by the test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim.parent), env.get("PYTHONPATH", "")])
    csv = tmp_path / "results.csv"
    csv.write_text("   epoch, train/box_loss,   val/box_loss\n"
                   + "".join(f"{e:>8},{2.0 - e / 10:>8},{'nan' if e > 3 else 1.5:>8}\n"
                             for e in range(1, 8)))  # fmt: skip
    code, out, log = _replay(csv, tmp_path / "csv", env)
    assert code == 0 and "Traceback" not in out, out
    assert "critical Detected anomaly step=5 trigger=eval_loss_nonfinite" in log
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("".join(f'{{"step": {s}, "loss": {1 / s}}}\n' for s in range(1, 9)))
    code, out, _ = _replay(jsonl, tmp_path / "jsonl", env)
    assert code == 0 and "replayed 8 records" in out, out
    events = tmp_path / "events.out.tfevents.1.host.1.0"
    events.write_bytes(b"")
    code, out, _ = _replay(events, tmp_path / "tb", env)
    assert code == 2 and "Traceback" not in out and "[tensorboard]" in out, out


def test_metrics_endpoint_shows_every_series_and_its_last_value(tmp_path: Path) -> None:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from smart_monitor.config import load_config
    from smart_monitor.hooks.metrics import MetricsServer
    from smart_monitor.outputs.log import make_logger
    from smart_monitor.outputs.snapshot import SnapshotWriter
    from smart_monitor.runtime.engine import Engine
    from smart_monitor.sources.checkpoints import CheckpointIndex

    config = load_config(snapshot_dir=tmp_path / "snaps", log_dir=tmp_path / "logs")
    log, _ = make_logger(config.log_dir, stderr=None)
    index = CheckpointIndex(None, config.checkpoints)
    engine = Engine(config, log, index, SnapshotWriter(config.snapshot_dir))
    engine.ingest.handle_lines(
        [b'{"step": 1, "loss": 2.0, "aux_loss": 0.5, "lr": 0.001}',
         b'{"step": 1, "eval_loss": 2.5, "eval_accuracy": 0.25}'], 0,
    )  # fmt: skip
    server = MetricsServer(engine, config)
    port = server.start()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        server.stop()
    found = {
        (s.labels["series"], s.labels["role"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "smart_monitor_series_value"
    }
    assert found == {
        ("loss", "train_loss"): 2.0, ("aux_loss", "train_loss"): 0.5,
        ("learning_rate", "learning_rate"): 0.001, ("eval_loss", "eval_loss"): 2.5,
        ("eval_accuracy", "eval_metric_higher"): 0.25,
    }  # fmt: skip


def test_no_loss_series_is_said_after_a_while_and_at_most_hourly() -> None:
    from smart_monitor.runtime.watching import NO_LOSS_AFTER, NO_LOSS_EVERY, SeriesWatch

    said: list[tuple[str, dict[str, object]]] = []

    class Log:
        def info(self, event: str, **fields: object) -> None:
            said.append((event, fields))

        def warning(self, event: str, **fields: object) -> None:
            said.append((event, fields))

    now = [0.0]
    book = SeriesBook({})
    watch = SeriesWatch(book, Log(), lambda: now[0])
    book.observe({"step": 1, "my_objective": 0.5})
    watch.after(records=True)
    assert [e for e, _ in said] == ["Watching series"]  # once the first records are in
    for t in (NO_LOSS_AFTER - 1, NO_LOSS_AFTER, NO_LOSS_AFTER + 10, NO_LOSS_AFTER + NO_LOSS_EVERY):
        now[0] = t
        watch.after(records=True)
    assert [e for e, _ in said] == ["Watching series", "No loss series", "No loss series"]
    assert said[1][1]["seen"] == "my_objective" and watch.blind
    book.observe({"step": 2, "my_loss": 0.4})  # a loss at last: said, and no more warnings
    now[0] += 2 * NO_LOSS_EVERY
    watch.after(records=True)
    now[0] += 2 * NO_LOSS_EVERY
    watch.after(records=True)
    assert [e for e, _ in said][3:] == ["Watching series"]
    assert said[3][1]["train_loss"] == "my_loss"


def test_watching_series_is_said_again_when_a_role_gets_its_main_series() -> None:
    """Live, a Keras run's validation folder writes its first scalars an epoch after
    the train folder: the line is said again then, and not for a series that adds
    nothing (another one in a role that has its main, or one ignored)."""
    from smart_monitor.runtime.watching import SeriesWatch

    said: list[dict[str, object]] = []

    class Log:
        def info(self, event: str, **fields: object) -> None:
            said.append(fields)

    book = SeriesBook({})
    watch = SeriesWatch(book, Log(), lambda: 0.0)
    for entry in (
        {"step": 0, book.key("epoch_loss", "train"): 0.5},
        {"step": 0, book.key("epoch_accuracy", "train"): 0.7},  # a new role: news
        {"step": 1, "loss": 0.4, "train/accuracy": 0.8},  # nothing new
        {"step": 0, book.key("evaluation_loss_vs_iterations", "validation"): 0.6},  # ignored
        {"step": 0, book.key("epoch_loss", "validation"): 0.6},  # the eval loss comes
        {"step": 1, book.key("epoch_loss", "validation"): 0.5},
    ):
        book.observe(entry)
        watch.after(records=True)
    assert [sorted(f) for f in said] == [
        ["train_loss"], ["train_loss", "train_metric_higher"],
        ["eval_loss", "ignored", "train_loss", "train_metric_higher"],
    ]  # fmt: skip
    assert said[-1]["eval_loss"] == "validation/epoch_loss(main)"
    assert said[-1]["ignored"] == "evaluation_loss_vs_iterations"


def test_event_files_are_ordered_by_their_first_event_wall_time(tmp_path: Path) -> None:
    import struct

    from smart_monitor.sources.metrics_source import _files

    def event_file(name: str, wall: float) -> Path:
        data = b"\x09" + struct.pack("<d", wall)  # Event.wall_time, field 1, first
        path = tmp_path / name
        path.write_bytes(struct.pack("<Q", len(data)) + b"\0" * 4 + data + b"\0" * 4)
        return path

    # the names say the other order (a clock set back between the two writers)
    late = event_file("events.out.tfevents.100.host.1.0", 2000.0)
    early = event_file("events.out.tfevents.200.host.1.1", 1000.0)
    assert _files(tmp_path, "tensorboard") == [early, late]


def test_a_csv_backlog_is_read_in_slices_and_nothing_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from smart_monitor.sources import csv_metrics

    monkeypatch.setattr(csv_metrics, "_SLICE", 64)  # a few rows a read
    path = tmp_path / "metrics.csv"
    rows = [f"{s},{1 / s}\n" for s in range(1, 101)]
    rows[50] = f"51,{'1' * 100}\n"  # one row longer than a slice
    path.write_text("step,train_loss\n" + "".join(rows))
    f = csv_metrics.CsvFollower(path, SeriesBook({}), lambda *a: None, lambda *a: None)
    got: list[int] = []
    reads = 0
    while True:
        before = f.position
        got += [e["step"] for e in f.read()]
        reads += 1
        if f.position == before:
            break
    assert got == list(range(1, 101)) and reads > 10


def test_the_main_series_survive_a_restart() -> None:
    import json

    book = SeriesBook({})
    assert book.key("epoch_loss", "validation") == "eval_loss"
    restarted = SeriesBook({})
    restarted.load_state_dict(json.loads(json.dumps(book.state_dict())))
    # the first tag read after the restart is another eval loss: not made the main one
    assert restarted.key("evaluation_loss_vs_iterations", "validation") != "eval_loss"
    assert restarted.key("epoch_loss", "validation") == "eval_loss"


def test_a_row_without_the_main_loss_does_not_lend_it_another(tmp_path: Path) -> None:
    # Lightning logs a GAN's two optimizers on rows of their own
    csv = tmp_path / "metrics.csv"
    rows = [f"{s},{0.7 if s % 2 else ''},{'' if s % 2 else 1.2}\n" for s in range(1, 21)]
    rows[13] = "14,,nan\n"  # a generator row: its loss goes NaN, the critic's is not there
    csv.write_text("step,critic_loss,generator_loss\n" + "".join(rows))
    code, _, log = _replay(csv, tmp_path / "out")
    assert code == 0
    found = re.findall(r"critical Detected anomaly step=(\d+) trigger=(\S+)", log)
    assert found == [("14", "generator_loss_nonfinite")], log


def test_an_hf_run_evaluated_on_several_sets_has_one_main_eval_loss(tmp_path: Path) -> None:
    """HF logs one record per eval set (``eval_g0_loss``, then ``eval_g1_loss`` at the
    same step). The first set's loss is the main eval loss; the other set's, far lower,
    is a series of its own: read as the main one, it made a best model of every
    evaluation of the easier set, and hid the first set's overfitting."""
    lines = []
    for s in range(1, 401):
        lines.append(f'{{"step": {s}, "loss": {2.0 / s ** 0.3:.4f}, "learning_rate": 1e-4}}')
        if s % 50 == 0:
            lines.append(f'{{"step": {s}, "eval_g0_loss": {1.0 + s / 4000:.4f}}}')  # worse
            lines.append(f'{{"step": {s}, "eval_g1_loss": {0.5 - s / 4000:.4f}}}')  # better
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    code, out, log = _replay(path, tmp_path / "out")
    assert code == 0, out
    found = re.findall(r"Detected anomaly step=(\d+) trigger=(\S+) ", log)
    # g0 rises from its first evaluation on: overfitting, and no best model of g1's
    assert found == [("400", "overfitting_from_50")], found
