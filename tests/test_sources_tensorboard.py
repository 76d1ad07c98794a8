"""TensorBoard event files as a metrics source: written by the real
``torch.utils.tensorboard.SummaryWriter``, read by the real reader, under the default
config. Replay of an event file and of the same data as JSONL give the same triggers."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from live_harness import SMART_MONITOR, Live, config, wait_until

from smart_monitor.config import load_config
from smart_monitor.outputs.log import make_logger
from smart_monitor.runtime.replay import replay
from smart_monitor.sources.metrics_source import FolderSource
from smart_monitor.sources.steps import WRITER_STARTED

DEV = Path(__file__).parents[1].parent / "shared" / "real-runs" / "dev"
DEV_RUNS = sorted(DEV.glob("*.jsonl"))
# the JSONL keys as HF's TensorBoard callback names them
TAGS = {"loss": "train/loss", "learning_rate": "train/learning_rate",
        "grad_norm": "train/grad_norm", "epoch": "train/epoch", "eval_loss": "eval/loss"}


def write_events(folder: Path, records: list[dict[str, Any]], exact: bool = False) -> Path:
    """``records`` as one event file; ``exact``: float64 tensors (HF and Lightning
    write float32 ``simple_value``s, which round the JSONL's numbers)."""
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(folder))
    for r in records:
        for key, value in r.items():
            if key != "step":
                w.add_scalar(TAGS.get(key, key), value, r["step"], new_style=exact,
                             double_precision=exact)
    w.close()
    (path,) = [p for p in folder.iterdir() if p.name.startswith("events.out.tfevents.")]
    return path


def train_records(first: int, last: int) -> list[dict[str, Any]]:
    return [{"step": s, "loss": 2.0 / (1 + s) ** 0.3, "learning_rate": 1e-3, "grad_norm": 1.0}
            for s in range(first, last + 1)]


def detections(metrics: Path, out: Path) -> list[str]:
    cfg = load_config(None, metrics_file=metrics, snapshot_dir=out / "snapshots",
                      log_dir=out / "logs", state_dir=out / "state")
    log, daily = make_logger(cfg.log_dir, stderr=None)
    replay(cfg, metrics, log, progress=False)
    assert daily is not None
    daily.close()
    text = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    return re.findall(r"Detected anomaly (step=\S+ trigger=\S+)", text)


@pytest.mark.parametrize("jsonl", DEV_RUNS, ids=[p.name.split("__")[1] for p in DEV_RUNS])
def test_replay_of_event_file_gives_the_jsonl_triggers(jsonl: Path, tmp_path: Path) -> None:
    records = [json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()]
    write_events(tmp_path / "tb", records, exact=True)
    want = detections(jsonl, tmp_path / "out-jsonl")
    got = detections(tmp_path / "tb", tmp_path / "out-tb")
    assert got == want
    assert len(DEV_RUNS) >= 10


class Events:
    """What a FolderSource reports, and a clock the test moves."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.malformed: list[tuple[str, str, int | None]] = []
        self.now = 0.0

    def source(self, path: Path, state: dict[str, Any] | None = None) -> FolderSource:
        src = FolderSource(path, None, "auto", {}, 2.0, lambda n, f: self.names.append(n),
                           lambda *a: self.malformed.append(a), lambda: self.now)
        if state is not None:
            src.load_state_dict(state)
        return src


def read_all(src: FolderSource) -> list[dict[str, Any]]:
    """The entries, less the ``WRITER_STARTED`` marks (tested on their own)."""
    return [e for batch in src.batches() for e in batch if WRITER_STARTED not in e]


def test_a_step_is_given_out_when_the_next_begins_or_after_quiet(tmp_path: Path) -> None:
    write_events(tmp_path, [*train_records(1, 3), {"step": 3, "eval_loss": 2.5}])
    ev = Events()
    src = ev.source(tmp_path)
    got = read_all(src)
    assert [e["step"] for e in got] == [1, 2]
    assert got[0] == pytest.approx(train_records(1, 1)[0], rel=1e-6)  # float32 on disk
    ev.now = 1.9
    assert read_all(src) == []  # step 3 may still grow
    ev.now = 2.0
    last = read_all(src)
    assert [sorted(e) for e in last] == [["grad_norm", "learning_rate", "loss", "step"],
                                         ["eval_loss", "step"]]  # train and eval apart


def test_truncated_record_is_waited_for_and_counted(tmp_path: Path) -> None:
    full = write_events(tmp_path / "w", train_records(1, 40))
    data = full.read_bytes()
    run = tmp_path / "run"
    run.mkdir()
    target = run / full.name
    cut = len(data) * 2 // 3
    target.write_bytes(data[:cut])  # the trainer killed mid-write, or still writing
    ev = Events()
    src = ev.source(run)
    first = read_all(src)
    assert read_all(src) == []
    assert ev.names.count("Waiting for truncated event record") == 1  # once, not per read
    with open(target, "ab") as fh:
        fh.write(data[cut:])
    rest = read_all(src)
    ev.now = 10.0  # quiet since: the last step is complete
    rest += read_all(src)
    assert [e["step"] for e in first + rest] == list(range(1, 41))
    assert ev.malformed == []


def test_a_step_is_not_given_out_while_its_file_ends_inside_a_record(tmp_path: Path) -> None:
    """A writer flushes its buffer in chunks: the record cut at the end of the file may
    hold more scalars of the pending step, so the quiet period does not complete it."""
    full = write_events(tmp_path / "w", [
        {"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9, "learning_rate": 1e-3}])
    data = full.read_bytes()
    run = tmp_path / "run"
    run.mkdir()
    target = run / full.name
    target.write_bytes(data[: record_ends(data)[-2] + 5])  # step 2's LR record cut short
    ev = Events()
    src = ev.source(run)
    assert [e["step"] for e in read_all(src)] == [1]
    ev.now = 10.0  # quiet, but mid-record
    assert read_all(src) == []
    with open(target, "ab") as fh:
        fh.write(data[record_ends(data)[-2] + 5 :])
    ev.now = 20.0
    assert read_all(src) == []  # the record completed: quiet counts from now
    ev.now = 30.0
    (last,) = read_all(src)
    assert last == pytest.approx({"step": 2, "loss": 1.9, "learning_rate": 1e-3}, rel=1e-6)
    target.write_bytes(data[: record_ends(data)[-2] + 5])  # a trainer killed mid-write
    ev2 = Events()
    src2 = ev2.source(run)
    read_all(src2)
    ev2.now = 200.0  # past the writers' flush interval: the complete scalars go out
    assert [sorted(e) for e in read_all(src2)] == [["loss", "step"]]


def test_corrupt_record_is_counted_never_a_crash(tmp_path: Path) -> None:
    full = write_events(tmp_path, train_records(1, 40))
    data = bytearray(full.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a bit flip in one record's bytes
    full.write_bytes(bytes(data))
    ev = Events()
    src = ev.source(tmp_path)
    got = read_all(src)
    assert read_all(src) == []
    ((reason, detail, offset),) = ev.malformed  # counted once
    assert reason == "crc_mismatch" and full.name in detail and offset < len(data) // 2
    assert 5 < len(got) < 40 and [e["step"] for e in got] == list(range(1, len(got) + 1))


def test_resume_from_saved_state_loses_and_repeats_nothing(tmp_path: Path) -> None:
    full = write_events(tmp_path / "w", train_records(1, 300))
    data = full.read_bytes()
    whole = Events().source(tmp_path / "w")
    want = read_all(whole) + whole.finish()
    rng = random.Random(0)
    for i in range(5):
        run = tmp_path / f"run{i}"
        run.mkdir()
        cut = rng.randrange(len(data))
        (run / full.name).write_bytes(data[:cut])
        ev = Events()
        src = ev.source(run)
        got = read_all(src)
        state = json.loads(json.dumps(src.state_dict()))
        src.close()
        with open(run / full.name, "ab") as fh:
            fh.write(data[cut:])
        again = Events().source(run, state)
        got += read_all(again)
        got += again.finish()
        assert got == want, f"cut at {cut}"


def test_new_event_file_of_a_restarted_trainer_is_picked_up(tmp_path: Path) -> None:
    write_events(tmp_path / "version_0", train_records(1, 20))
    ev = Events()
    src = ev.source(tmp_path)
    assert [e["step"] for e in read_all(src)] == list(range(1, 20))  # 20 pending
    write_events(tmp_path / "version_1", train_records(11, 30))  # resumed from step 10
    got = read_all(src)
    assert [e["step"] for e in got] == [20, *range(11, 30)]  # the old file's last step first
    assert ev.names.count("Opened metrics file") == 2


def record_ends(data: bytes) -> list[int]:
    """The offset after each record of an event file (length, its CRC, data, CRC)."""
    ends, at = [], 0
    while at < len(data):
        at += 16 + int.from_bytes(data[at : at + 8], "little")
        ends.append(at)
    return ends


@pytest.mark.parametrize("cut", ["mid_record", "between_records"])
def test_live_daemon_follows_a_folder_and_resumes_after_restart(
    tmp_path: Path, cut: str
) -> None:
    """FAULTS #3 for event files: stopped with the file cut anywhere, restarted after
    the rest arrived, every step is handled once. The engine's counts are kept in the
    state, so the total over both lives is the file's step count."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = config(tmp_path, metrics_file=run, source={"quiet_seconds": 0.2})
    full = write_events(tmp_path / "w", train_records(1, 120))
    data = full.read_bytes()
    ends = record_ends(data)  # the file's version record, then 3 scalars a step
    assert len(ends) == 1 + 3 * 120
    # in step 60's last scalar, or after it
    half = ends[179] + 5 if cut == "mid_record" else ends[180]
    target = run / full.name
    target.write_bytes(data[:half])
    live = Live(cfg)
    source = live.daemon.tailer
    assert isinstance(source, FolderSource)
    if cut == "mid_record":  # the pending step may grow: held past the quiet period
        live.wait_log("Waiting for truncated event record")
        wait_until(lambda: live.records > 0, "the complete steps of the first half")
        assert source.deadline - live.daemon.clock() > 60
    else:
        wait_until(lambda: live.records > 0 and source.deadline == float("inf"),
                   "the first half, its last step given out after the quiet period")
    live.stop()
    with open(target, "ab") as fh:
        fh.write(data[half:])
    live = Live(cfg)
    source = live.daemon.tailer
    assert isinstance(source, FolderSource)
    wait_until(lambda: live.records >= 120 and source.deadline == float("inf"),
               "every step, the last one after the quiet period")
    assert live.records == 120  # nothing read twice
    live.wait_log("Resumed metrics file")
    live.stop()


def test_without_the_extra_run_and_replay_say_which_to_install(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker" / "tensorboard"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    events = write_events(tmp_path / "run", train_records(1, 5))
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    for args in (["replay", "--metrics", str(events)],
                 ["run", "--metrics", str(tmp_path / "run")]):
        res = subprocess.run([str(SMART_MONITOR), *args, "--output", str(tmp_path / "out")],
                             capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 2, res.stderr
        (line,) = res.stderr.strip().splitlines()
        assert "pip install 'smart-monitor[tensorboard]'" in line and "metrics_file" in line
    shutil.rmtree(blocker.parent)


def test_a_reader_that_stops_after_any_batch_loses_nothing(tmp_path: Path) -> None:
    """The daemon stops taking batches when its turn is over (a backlog in slices)."""
    write_events(tmp_path / "version_0", train_records(1, 5000))
    whole = Events().source(tmp_path)
    want = read_all(whole) + whole.finish()
    src = Events().source(tmp_path)
    got: list[dict[str, Any]] = []
    while True:
        batch = next(src.batches(), None)  # one batch per turn, the generator dropped
        if batch is None:
            break
        got += [e for e in batch if WRITER_STARTED not in e]
    got += src.finish()
    assert got == want and len(got) == 5000


def test_event_file_replaced_or_truncated_at_its_path_is_read_again(tmp_path: Path) -> None:
    first = write_events(tmp_path / "a", train_records(1, 30))
    second = write_events(tmp_path / "b", train_records(1, 10))
    run = tmp_path / "run"
    run.mkdir()
    target = run / first.name
    shutil.copy(first, target)
    ev = Events()
    src = ev.source(run)
    assert len(read_all(src)) == 29
    shutil.copy(second, run / "tmp")
    os.replace(run / "tmp", target)  # a new inode at the path
    ev.now = 5.0
    got = read_all(src) + read_all(src)
    assert [e["step"] for e in got] == [30, *range(1, 10)]  # the old last step, then anew
    assert "Metrics file replaced" in ev.names
    with open(target, "r+b") as fh:  # the same inode, cut back
        fh.truncate(first.stat().st_size // 10)
    read_all(src)
    assert "Metrics file truncated" in ev.names


def test_a_new_file_s_first_entries_come_after_a_writer_mark(tmp_path: Path) -> None:
    """Each file opened afresh marks its first entries, also when they come out by a
    flush (a one-step file, dev-tb T17's ``.3``-``.6``); a file resumed from the
    saved state is no new writer."""
    write_events(tmp_path / "version_0", train_records(1, 20))
    ev = Events()
    src = ev.source(tmp_path)
    first = [e for batch in src.batches() for e in batch]
    assert first[0] == {WRITER_STARTED: str(next((tmp_path / "version_0").iterdir()))}
    assert [e["step"] for e in first[1:]] == list(range(1, 20))
    state = json.loads(json.dumps(src.state_dict()))
    write_events(tmp_path / "version_1", train_records(5, 5))  # one step: given by flush
    write_events(tmp_path / "version_2", train_records(5, 8))
    got = [e for batch in src.batches() for e in batch] + src.finish()
    marks = [i for i, e in enumerate(got) if WRITER_STARTED in e]
    steps = [e.get("step") for e in got]
    assert steps == [20, None, 5, None, 5, 6, 7, 8] and marks == [1, 3]
    again = ev.source(tmp_path, state)
    assert [e for batch in again.batches() for e in batch if WRITER_STARTED in e] == [
        {WRITER_STARTED: str(next((tmp_path / f"version_{i}").iterdir()))} for i in (1, 2)
    ]  # version_0 resumed from the state: not marked
