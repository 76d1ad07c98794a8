"""MetricsWriter: the lines it writes are the lines the daemon reads."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from smart_monitor.integrations.writer import MetricsWriter, global_rank
from smart_monitor.records import ExampleRecord, TrainRecord, parse_line


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def test_records_round_trip_through_the_daemon_parser(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "metrics.jsonl"
    with MetricsWriter(path, rank=0) as w:
        w.log(10, loss=0.5, lr=1e-4, grad_norm=float("nan"))
        w.log(20, loss=float("inf"), learning_rate=2e-4)
    first, second = (parse_line(line) for line in lines(path))
    assert isinstance(first, TrainRecord) and isinstance(second, TrainRecord)
    assert (first.step, first.loss, first.learning_rate) == (10, 0.5, 1e-4)
    assert first.grad_norm is not None and math.isnan(first.grad_norm)
    assert second.loss == math.inf
    assert b'"grad_norm": NaN' in lines(path)[0]  # the bare token, as json.dumps writes


def test_every_line_is_on_disk_as_soon_as_it_is_logged(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path, rank=0)
    w.log(1, loss=1.0)
    assert path.read_bytes() == b'{"step": 1, "loss": 1.0}\n'  # not held in a buffer
    w.log(2, loss=0.9)
    assert len(lines(path)) == 2
    w.close()


def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n')
    with MetricsWriter(path, rank=0) as w:
        w.log(2, loss=0.9)
    assert [json.loads(x)["step"] for x in lines(path)] == [1, 2]


def test_examples_become_example_records(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path, rank=0) as w:
        w.log_examples(30, [
            {"prompt": "2+2", "golden_answer": "4", "model_answer": " 4 ", "loss": 0.1},
            {"prompt": "3+3", "golden_answer": "6", "model_answer": "7", "loss": 0.05},
        ])
    records = [parse_line(line) for line in lines(path)]
    assert all(isinstance(r, ExampleRecord) and r.step == 30 for r in records)
    assert [r.matches for r in records if isinstance(r, ExampleRecord)] == [True, False]


def test_numpy_and_torch_scalars_are_written_as_numbers(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path, rank=0) as w:
        step: Any = np.int64(5)  # a step read back from a numpy counter
        w.log(step, loss=np.float32(0.25), grad_norm=torch.tensor(1.5),
              extra={"acc": np.float64(0.75)})
    assert json.loads(lines(path)[0]) == {
        "step": 5, "loss": 0.25, "grad_norm": 1.5, "extra": {"acc": 0.75}
    }


@pytest.mark.parametrize(
    "env", [{"RANK": "1"}, {"LOCAL_RANK": "2"}, {"RANK": "3", "LOCAL_RANK": "0"}]
)
def test_only_rank_zero_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert global_rank() != 0
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        w.log(1, loss=1.0)
    assert not path.exists()


def test_global_rank_zero_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as w:
        w.log(1, loss=1.0)
    assert len(lines(path)) == 1


_WRITER = """
import sys
from smart_monitor.integrations.writer import MetricsWriter
w = MetricsWriter(sys.argv[1], rank=0)
pad = "x" * int(sys.argv[3])
for i in range(int(sys.argv[2])):
    w.log(i, loss=0.5, note=pad)
w.close()
"""


def test_two_writers_never_interleave_within_a_line(tmp_path: Path) -> None:
    """One write() on O_APPEND per line: lines of concurrent processes (an evaluation
    job appending beside the trainer) stay whole."""
    path = tmp_path / "metrics.jsonl"
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), "400", str(pad)])
        for pad in (3000, 5000)
    ]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    parsed = [json.loads(line) for line in lines(path)]
    assert len(parsed) == 800
    assert sorted(len(r["note"]) for r in parsed) == [3000] * 400 + [5000] * 400
