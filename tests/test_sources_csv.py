"""Lightning ``CSVLogger``'s ``metrics.csv`` as a metrics source: rows written by the
real logger, a header rewrite handled as a replacement, never a corruption."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from live_harness import SMART_MONITOR

from smart_monitor.series import SeriesBook
from smart_monitor.sources.csv_metrics import CsvFollower
from smart_monitor.sources.steps import WRITER_STARTED


def follower(path: Path, events: list[str]) -> CsvFollower:
    return CsvFollower(
        path, SeriesBook({}), lambda name, fields: events.append(name), lambda *a: None
    )


def lightning_csv(
    root: Path, batches: list[tuple[dict[str, float], int]], logger: Any = None
) -> tuple[Path, Any]:
    """``log_metrics`` then ``save`` per batch, as Lightning's logger connector does;
    the file and the logger (to go on with)."""
    from lightning.pytorch.loggers import CSVLogger

    logger = logger or CSVLogger(root)
    for metrics, step in batches:
        logger.log_metrics(metrics, step)
        logger.save()
    return Path(logger.experiment.metrics_file_path), logger


def test_rows_become_records_with_the_columns_set(tmp_path: Path) -> None:
    events: list[str] = []
    path, _ = lightning_csv(tmp_path, [({"train_loss": 0.5, "epoch": 0}, 4),
                                       ({"lr-Adam": 1e-3}, 4), ({"val_loss": 0.7, "epoch": 0}, 9)])
    got = follower(path, events).read()
    assert got == [
        {"step": 4, "epoch": 0.0, "loss": 0.5},
        {"step": 4, "learning_rate": 1e-3},
        {"step": 9, "epoch": 0.0}, {"step": 9, "eval_loss": 0.7},  # train and eval apart
    ]


def test_header_rewrite_continues_after_the_rows_handled(tmp_path: Path) -> None:
    events: list[str] = []
    path, logger = lightning_csv(tmp_path, [({"train_loss": 0.5}, s) for s in range(3)])
    f = follower(path, events)
    assert [e["step"] for e in f.read()] == [0, 1, 2]
    header = path.read_text().splitlines()[0]
    logger.log_metrics({"train_loss": 0.4}, 3)
    logger.log_metrics({"val_loss": 0.9}, 3)  # a new column: the file is rewritten
    logger.save()
    assert path.read_text().splitlines()[0] != header
    got: list[dict[str, Any]] = f.read()
    assert got == [{"step": 3, "loss": 0.4}, {"step": 3, "eval_loss": 0.9}]
    assert events.count("Metrics file rewritten") == 1
    assert f.read() == []


def test_a_rewrite_caught_half_done_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    rows = [f"{0.5 - s / 100},{s}" for s in range(5)]
    path.write_text("\n".join(["train_loss,step", *rows]) + "\n")
    events: list[str] = []
    f = follower(path, events)
    assert len(f.read()) == 5
    with open(path, "w") as fh:  # truncated and rewritten, caught after two rows
        fh.write("step,train_loss,val_loss\n0,0.5,\n1,0.49,\n")
    assert f.read() == []
    with open(path, "a") as fh:
        fh.write("2,0.48,\n3,0.47,\n4,0.46,\n5,0.45,\n6,,0.8\n")
    assert f.read() == [{"step": 5, "loss": 0.45}, {"step": 6, "eval_loss": 0.8}]


def test_truncated_under_the_same_header_is_a_new_run(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("step,train_loss\n" + "".join(f"{s},0.5\n" for s in range(10)))
    events: list[str] = []
    f = follower(path, events)
    assert len(f.read()) == 10
    path.write_text("step,train_loss\n0,0.9\n")  # same inode, same header, shorter
    assert f.read() == [{"step": 0, "loss": 0.9}]
    assert events == ["Metrics file truncated"]


def test_a_row_still_being_written_waits_for_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("step,train_loss\n0,0.5\n1,0.4")
    f = follower(path, [])
    assert f.read() == [{"step": 0, "loss": 0.5}]
    with open(path, "a") as fh:
        fh.write("9\n")
    assert f.read() == [{"step": 1, "loss": 0.49}]


def test_replay_of_a_csv_folder(tmp_path: Path) -> None:
    rows = [({"train_loss": 1.0 / (s + 1), "lr-Adam": 1e-3 if s < 150 else 5e-2}, s)
            for s in range(200)]
    lightning_csv(tmp_path / "run", [*rows, ({"val_loss": 0.5}, 199)])
    res = subprocess.run(
        [str(SMART_MONITOR), "replay", "--metrics", str(tmp_path / "run"),
         "--output", str(tmp_path / "out"), "--no-plots", "--report"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    assert res.stdout.startswith("replayed 201 records (0 malformed)")
    assert re.search(r"^lr_zscore_\* +1 +150$", res.stdout, re.M), res.stdout


def test_resume_from_saved_state_reads_only_new_rows(tmp_path: Path) -> None:
    import json

    path = tmp_path / "metrics.csv"
    path.write_text("step,train_loss\n" + "".join(f"{s},0.5\n" for s in range(10)))
    f = follower(path, [])
    assert len(f.read()) == 10
    state = json.loads(json.dumps(f.state_dict()))
    with open(path, "a") as fh:
        fh.write("10,0.4\n")
    again = CsvFollower(path, SeriesBook({}), lambda name, fields: None, lambda *a: None, state)
    assert again.read() == [{"step": 10, "loss": 0.4}]


def test_ultralytics_time_going_back_marks_a_new_writer(tmp_path: Path) -> None:
    """``time`` is seconds since the trainer started: a run appended to the same
    ``results.csv`` (dev-tb T09) restarts it, and its first row comes after a mark."""
    path = tmp_path / "results.csv"
    head = "                  epoch,                   time,         train/box_loss\n"
    path.write_text(head + "".join(f"{e},{20.0 * e},{2.0 - e / 10}\n" for e in range(1, 6)))
    f = follower(path, [])
    got = f.read()
    assert WRITER_STARTED not in str(got) and [e["step"] for e in got] == [1, 2, 3, 4, 5]
    state = f.state_dict()
    with open(path, "a") as fh:  # the same epoch, the clock going on: no new writer
        fh.write("6,120.0,1.4\n4,20.7,1.6\n5,41.4,1.5\n")
    again = CsvFollower(path, SeriesBook({}), lambda *a: None, lambda *a: None, state)
    got = again.read()
    assert [e.get("step", WRITER_STARTED) for e in got] == [6, WRITER_STARTED, 4, 5]
    assert got[1] == {WRITER_STARTED: str(path)}
