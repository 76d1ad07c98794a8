"""FAULTS.md cases 52-58: the monitor is never wrong about which run it watches, never
blind because of one file it may not read, and never loses the evidence of an anomaly
to a full disk, a copy in flight or someone else's folder. Each test runs the real
daemon under the default config (the snapshot mode set to ``copy`` only where the
snapshot folder is another file system, which the start-up check otherwise refuses).

Cases with a second user run the real ``smart-monitor`` under ``setpriv`` as
``nobody`` (the tests run as root, for whom every permission check passes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_harness import (
    BACKENDS,
    SMART_MONITOR,
    Live,
    append,
    config,
    line,
    lines,
    log_text,
    loss_at,
    tmpfs_mount,
    wait_until,
    write_checkpoint,
)
from test_faults_config import NOBODY, cli, one_line_exit_2
from test_faults_disk import cpu_seconds
from test_faults_records import GOLF, alarms, anomaly_snapshots, events, records, replay, write
from test_metrics import free_port, scrape

from smart_monitor.config import load_config
from smart_monitor.pipeline import Pipeline
from smart_monitor.records import TrainRecord

MIB = 1 << 20


def nan_lines(first: int, last: int, at: int) -> bytes:
    return b"".join(
        line(s, float("nan")) if s == at else lines(s, s) for s in range(first, last + 1)
    )


def own_snapshots(snapshot_dir: Path) -> list[dict[str, Any]]:
    """The monitor's snapshots (its metadata carries ``created_at``), with their path."""
    found = []
    for p in sorted(snapshot_dir.glob("anomaly_*")):
        try:
            meta = json.loads((p / "metadata.json").read_text())
        except (OSError, ValueError):
            continue
        if "created_at" in meta:
            found.append({**meta, "_path": p})
    return found


# -- 52: a new run from scratch with another seed or model ------------------------------
def test_fault_52_new_run_with_another_first_loss_is_a_new_segment(tmp_path: Path) -> None:
    """parameter-golf's second run, its losses scaled x1.6 (another model size: its
    first loss 11.1, not 6.94). The old code took it for a resume, `Trainer restarted`,
    then a critical `divergence_detected` against the old run at step 10."""
    recs = records(GOLF)
    cut = next(i for i in range(1, len(recs)) if recs[i]["step"] < recs[i - 1]["step"])
    for r in recs[cut:]:
        for key in ("loss", "eval_loss"):
            if key in r:
                r[key] *= 1.6
    log = replay(write(tmp_path / "other_model.jsonl", recs), tmp_path / "out")
    (restart,) = events(log, "Run restarted")
    assert "step=1 previous_step=1009 " in restart and "segment=1" in restart
    assert not events(log, "Trainer restarted")
    assert not alarms(log), log
    assert anomaly_snapshots(tmp_path / "out") == []


def test_fault_52_steps_back_before_the_first_checkpoint_is_a_new_run_live(
    tmp_path: Path,
) -> None:
    """Live, the signal action armed against a real process standing in for the new
    trainer: the old run logged every step from 1 and saved checkpoint-100; the new
    one (another seed, loss x1.5) logs every 10 steps from 10. Step 10 is before the
    old run's first checkpoint, so no resume can land there: a new run. A resume from
    checkpoint-100 afterwards is still a resume."""
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pidfile = tmp_path / "trainer.pid"
        pidfile.write_text(f"{trainer.pid}\n")
        live = Live(config(tmp_path, actions={"signal": {"pidfile": str(pidfile)}}))
        try:
            metrics = live.config.metrics_file
            assert metrics is not None
            write_checkpoint(tmp_path / "run", 100)
            append(metrics, lines(1, 300))
            live.wait_records(300)
            new = b"".join(line(s, loss_at(s) * 1.5) for s in range(10, 301, 10))
            append(metrics, new)
            live.wait_log(" Run restarted ", timeout=30)
            live.wait_records(330)
            append(metrics, b"".join(line(s, loss_at(s) * 1.5) for s in range(101, 131)))
            live.wait_log(" Trainer restarted ", timeout=30)  # a resume stays a resume
        finally:
            live.stop()
        log = live.log()
        (restart,) = events(log, "Run restarted")
        assert "step=10 previous_step=300 " in restart
        assert "step=101 previous_step=300 " in events(log, "Trainer restarted")[0]
        assert not alarms(log), log
        assert " Action done " not in log and " Action failed " not in log, log
        assert trainer.poll() is None, "the new trainer was signalled"
    finally:
        trainer.kill()
        trainer.wait()


def results_csv(path: Path, rows: list[tuple[int, float, float]]) -> Path:
    """An Ultralytics ``results.csv``: epoch, seconds since the trainer started, loss."""
    head = "                  epoch,                   time,         train/box_loss\n"
    path.write_text(head + "".join(f"{e},{t:.1f},{loss:.5f}\n" for e, t, loss in rows))
    return path


@pytest.mark.parametrize("clock", ["reset", "going_on"])
def test_fault_52_a_run_appended_by_a_new_process_is_a_new_run(
    tmp_path: Path, clock: str
) -> None:
    """dev-tb T09's shape: a second run appended to the same ``results.csv`` goes back
    from epoch 60 to 50 with its ``time`` reset and its losses 1.5x (another seed).
    A replay sees no checkpoint a resume could load: a new run, no alarm. The same rows
    with the clock going on are one process going back: a resume, as before."""
    first = [(e, 20.0 * e, loss_at(e)) for e in range(1, 61)]
    second = [(e, 20.0 * (e - 49 if clock == "reset" else e + 11), 1.5 * loss_at(e))
              for e in range(50, 71)]
    log = replay(results_csv(tmp_path / "results.csv", first + second), tmp_path / "out")
    if clock == "reset":
        (restart,) = events(log, "Run restarted")
        assert "step=50 previous_step=60 " in restart and "segment=1" in restart
        assert not events(log, "Trainer restarted")
    else:
        assert "step=50 previous_step=60 " in events(log, "Trainer restarted")[0]
        assert not events(log, "Run restarted")


def test_fault_52_a_new_writer_past_a_checkpoint_is_a_resume() -> None:
    """A new writer whose steps go back is a new run only while no checkpoint says it
    could be a resume; the mark lasts until the next train record, and it survives a
    JSON round-trip of the pipeline's state (a daemon stopped between the two)."""
    def fed(checkpoint: int | None) -> Pipeline:
        pipe = Pipeline(load_config(None))
        for s in range(1, 201):
            pipe.process(TrainRecord(s, loss_at(s), 1e-3, 1.0, {"step": s}))
            if s == checkpoint:
                pipe.checkpoint_seen(s)
        pipe.writer_started()
        return pipe

    def first_back(pipe: Pipeline, step: int) -> list[str]:
        out = pipe.process(TrainRecord(step, loss_at(step), 1e-3, 1.0, {"step": step}))
        said = [n.event for n in out.notes] if out is not None else []
        if out is not None and out.restarted_after is not None:
            said.append("Trainer restarted")
        return said

    pipe = fed(None)
    again = Pipeline(load_config(None))
    again.load_state_dict(json.loads(json.dumps(pipe.state_dict())))
    assert first_back(again, 150) == ["Run restarted"]
    pipe = fed(100)
    assert first_back(pipe, 150) == ["Trainer restarted"]  # checkpoint-100: a resume
    pipe = fed(None)
    assert first_back(pipe, 201) == []  # going on: the mark is spent
    assert first_back(pipe, 150) == ["Trainer restarted"]


def test_fault_52_a_new_writer_at_an_earlier_run_s_first_step_starts_over() -> None:
    """Runs repeated into one folder (Detectron2's output/, dev-tb T17): a short run
    ends at step 9, the next file begins at 19, the step the first run began at. By its
    steps it goes on; by where it begins it starts over, and a resume (which starts
    after a checkpoint) cannot begin there. A file beginning elsewhere goes on. The
    remembered starts survive a JSON round-trip of the state."""
    def record(step: int) -> TrainRecord:
        return TrainRecord(step, loss_at(step), 1e-3, 1.0, {"step": step})

    def said(pipe: Pipeline, step: int) -> list[str]:
        out = pipe.process(record(step))
        return [n.event for n in out.notes] if out is not None else []

    pipe = Pipeline(load_config(None))
    for s in range(19, 240, 20):
        pipe.process(record(s))
    pipe.writer_started()
    assert said(pipe, 9) == ["Run restarted"]  # back: a new run, as before
    again = Pipeline(load_config(None))
    again.load_state_dict(json.loads(json.dumps(pipe.state_dict())))
    again.writer_started()
    assert said(again, 19) == ["Run restarted"]  # where the first run began: over again
    for s in range(39, 300, 20):
        assert said(again, s) == []
    again.writer_started()
    assert said(again, 319) == []  # a file that begins elsewhere goes on
    assert said(again, 339) == []


# -- 53: one checkpoint, or the run folder, unreadable ----------------------------------
@pytest.fixture
def open_root() -> Iterator[Path]:
    """A folder ``nobody`` can reach (pytest's tmp_path is root's, mode 0700)."""
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed for the second user"
    assert os.geteuid() == 0, "switching to a second user needs root"
    root = Path(tempfile.mkdtemp(prefix="smart-monitor-faults-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def nobody_config(root: Path) -> Path:
    """The trainer's run (root's, group nogroup, umask 002: the deployment that keeps
    hard links) and an output folder that nobody owns."""
    run, out = root / "run", root / "out"
    append(run / "metrics.jsonl", lines(1, 30))
    write_checkpoint(run, 10)
    for p in [run, *run.rglob("*")]:
        p.chmod(0o775 if p.is_dir() else 0o664)
        os.chown(p, 0, 65534)
    out.mkdir()
    os.chown(out, 65534, 65534)
    toml = root / "nobody.toml"
    toml.write_text(
        f'metrics_file = "{run / "metrics.jsonl"}"\ncheckpoint_dir = "{run}"\n'
        f'snapshot_dir = "{out / "snapshots"}"\nlog_dir = "{out / "logs"}"\n'
        f'state_dir = "{out / "state"}"\n'
    )
    toml.chmod(0o644)
    return toml


def test_fault_53_unreadable_checkpoint_is_named_once_and_skipped(open_root: Path) -> None:
    """A trainer with umask 077 saved checkpoint-20 (0700, root's): the monitor says
    so once, with the path, and goes on reading and detecting; a NaN after it is
    caught and pinned to the newest checkpoint it may read. No busy loop, no Worker
    error, SIGTERM exits 0. (The old code: `Worker error` without a path, a core
    spinning, the NaN never seen, exit 1 with a traceback.)"""
    toml = nobody_config(open_root)
    run, out = open_root / "run", open_root / "out"
    hidden = write_checkpoint(run, 20)
    hidden.chmod(0o700)
    err = open_root / "err"
    with open(err, "wb") as fh:
        proc = subprocess.Popen(
            [*NOBODY, str(SMART_MONITOR), "run", "--config", str(toml)],
            stdout=subprocess.DEVNULL,
            stderr=fh,
        )
    try:
        wait_until(lambda: " Checkpoint unreadable " in log_text(out), "the unreadable one", 60)
        append(run / "metrics.jsonl", nan_lines(31, 50, at=40))
        wait_until(lambda: "Created snapshot step=40 " in log_text(out), "the NaN's snapshot", 60)
        before = cpu_seconds(proc.pid)
        time.sleep(3)  # the window in which a busy loop would burn a core
        spent = cpu_seconds(proc.pid) - before
        assert spent < 0.75, f"{spent:.2f} s of CPU in 3 s: a busy loop"
    finally:
        proc.terminate()
        code = proc.wait(30)
    log = log_text(out)
    assert code == 0, err.read_text()
    assert "Traceback" not in err.read_text()
    (said,) = events(log, "Checkpoint unreadable")
    assert f"path={hidden} " in said and "Permission denied" in said
    assert " Worker error " not in log
    [snap] = own_snapshots(out / "snapshots")
    assert snap["step"] == 40 and snap["checkpoint"]["name"] == "checkpoint-10"
    assert "errors=0 " in log.splitlines()[-1]


def test_fault_53_run_folder_0700_exits_2_like_check_config(open_root: Path) -> None:
    """The same verdict, one line, exit 2, from `check-config` and `run` (the old
    `run` exited 1 with a traceback)."""
    toml = nobody_config(open_root)
    (open_root / "run").chmod(0o700)
    run = str(open_root / "run")
    ran = one_line_exit_2(cli("run", "--config", toml, user=NOBODY), "Permission denied", run)
    checked = one_line_exit_2(cli("check-config", toml, user=NOBODY))
    assert ran == checked


def test_fault_53_a_turn_that_keeps_failing_backs_off(tmp_path: Path) -> None:
    """Whatever the error (here: every read raises), a trainer appending 200 lines
    one by one, each an inotify wake-up, makes a handful of failed turns, not one per
    wake-up: the retries back off. Once the error is gone, the lines are all read."""
    cfg = config(tmp_path)
    live = Live(cfg)
    read = live.daemon._read

    def broken() -> None:
        raise OSError(5, "Input/output error")

    live.daemon._read = broken  # type: ignore[method-assign]  # the fault itself
    try:
        for s in range(1, 201):
            append(cfg.metrics_file, line(s))  # type: ignore[arg-type]
            time.sleep(0.01)  # a trainer's pace: each append is a wake-up of its own
        live.wait_log(" Worker error ")
        errors = live.daemon.errors
        assert errors <= 12, f"{errors} failed turns for 200 wake-ups: no backoff"
        live.daemon._read = read  # type: ignore[method-assign]
        live.wait_records(200, timeout=120)  # the next retry reads them all
    finally:
        live.stop()


# -- 54: the service deployment: the monitor in the trainer's group --------------------
def service_setup(root: Path, umask: int, port: int = 0) -> Path:
    """The trainer's run folder as the trainer made it (root's, group nogroup, its
    mode from ``umask``), empty: the first start of a service, before the trainer."""
    toml = nobody_config(root)
    run = root / "run"
    shutil.rmtree(run)
    run.mkdir()
    os.chown(run, 0, 65534)
    run.chmod(0o777 & ~umask)
    if port:
        toml.write_text(toml.read_text() + f"[metrics]\nport = {port}\n")
    return toml


def trainer_saves(root: Path, umask: int) -> None:
    run = root / "run"
    append(run / "metrics.jsonl", lines(1, 30))
    write_checkpoint(run, 10)
    for p in [*run.rglob("*")]:
        os.chown(p, 0, 65534)
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def start_and_stop(toml: Path, err: Path, port: int = 0) -> tuple[int, str, dict[Any, float]]:
    """Run the monitor as nobody (in group nogroup) until it is started, scrape
    ``/metrics`` when ``port``, then SIGTERM it: the exit code and its stderr."""
    err.write_bytes(b"")
    with open(err, "ab") as fh:
        proc = subprocess.Popen(
            [*NOBODY, str(SMART_MONITOR), "run", "--config", str(toml)],
            stdout=subprocess.DEVNULL,
            stderr=fh,
        )
    scraped: dict[Any, float] = {}
    try:
        wait_until(lambda: proc.poll() is not None or " Started " in err.read_text(), "a start")
        if port and proc.poll() is None:
            scraped = scrape(port)
    finally:
        if proc.poll() is None:
            proc.terminate()
        code = proc.wait(30)
    return code, err.read_text(), scraped


def test_fault_54_umask_022_same_verdict_at_first_start_and_restart(open_root: Path) -> None:
    """Umask 022 (the default): the trainer's files will not be group-writable, so no
    link is allowed (fs.protected_hardlinks). The first start, before any checkpoint,
    refuses as a restart does; the old one started, copied every checkpoint in full,
    and then every restart exited 2, which systemd does not restart."""
    assert Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1"
    toml = service_setup(open_root, 0o022)
    first = one_line_exit_2(
        cli("run", "--config", toml, user=NOBODY),
        "fs.protected_hardlinks",
        "trainer's user or group",
    )
    assert str(open_root / "run") in first
    trainer_saves(open_root, 0o022)
    one_line_exit_2(
        cli("run", "--config", toml, user=NOBODY),
        "fs.protected_hardlinks",
        "trainer's user or group",
        "mode 644",
    )


def test_fault_54_umask_002_links_at_every_start_and_says_so(open_root: Path) -> None:
    """The documented deployment (umask 002 on the trainer's side): both starts link,
    the start says which mode and why, and /metrics shows it."""
    port = free_port()
    toml = service_setup(open_root, 0o002, port)
    code, err, scraped = start_and_stop(toml, open_root / "first.err", port)
    assert code == 0 and " Snapshot mode mode=hardlink " in err, err
    assert "group-writable" in err
    ((mode, why),) = [
        dict(k[1]).values() for k in scraped if k[0] == "smart_monitor_snapshot_mode_info"
    ]
    assert mode == "hardlink" and "group-writable" in why
    trainer_saves(open_root, 0o002)
    code, err, _ = start_and_stop(toml, open_root / "second.err")
    assert code == 0 and " Snapshot mode mode=hardlink " in err and "trial link" in err, err


def test_fault_54_signal_refused_by_the_trainers_user_is_said_at_start(open_root: Path) -> None:
    """In the group deployment the signal action cannot work (a signal needs the same
    user): said once at start, with the way out, not first when a run diverges."""
    toml = nobody_config(open_root)
    trainer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        pidfile = open_root / "trainer.pid"
        pidfile.write_text(f"{trainer.pid}\n")
        pidfile.chmod(0o644)
        toml.write_text(toml.read_text() + f'[actions.signal]\npidfile = "{pidfile}"\n')
        code, err, _ = start_and_stop(toml, open_root / "err")
    finally:
        trainer.kill()
        trainer.wait()
    assert code == 0, err
    (said,) = [x for x in err.splitlines() if " Action unavailable " in x]
    assert "action=signal" in said and "stop file" in said and str(trainer.pid) in said


def test_fault_54_a_link_refused_later_is_said_once_and_shown(tmp_path: Path) -> None:
    """Links work at start; later a checkpoint lands where no link can reach (here a
    file system mounted at checkpoint-80, as an EXDEV): the snapshot is a copy, and the
    change is one `Snapshot mode` warning and the /metrics mode, never silent."""
    port = free_port()
    cfg = config(tmp_path, metrics={"port": port})
    append(cfg.metrics_file, lines(1, 10))  # type: ignore[arg-type]
    with tmpfs_mount(tmp_path / "run" / "checkpoint-80", "16m"):
        write_checkpoint(tmp_path / "run", 80)
        live = Live(cfg)
        try:
            assert " Snapshot mode mode=hardlink " in live.log()
            append(cfg.metrics_file, lines(11, 100, spikes=(90,)))  # type: ignore[arg-type]
            live.wait_log("Created snapshot step=90 ", timeout=60)
            scraped = scrape(port)
        finally:
            live.stop()
    (said,) = [x for x in live.log().splitlines() if " Snapshot mode mode=copy " in x]
    assert "was=hardlink" in said and "checkpoint-80" in said
    modes = [dict(k[1]) for k in scraped if k[0] == "smart_monitor_snapshot_mode_info"]
    assert [m["mode"] for m in modes] == ["copy"]


# -- 55: a snapshot that cannot be written ----------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_mount(tmp_path / "small", "64m") as mounted:
        yield mounted


def test_fault_55_full_snapshot_disk_keeps_metadata_and_retries_the_pin(
    tmp_path: Path, small_disk: Path
) -> None:
    """The snapshot folder on a disk of its own (so copies) without room for the 1 MiB
    checkpoint: the anomaly still gets its folder with metadata.json saying what could
    not be pinned; once space comes back the pin is made into that folder."""
    cfg = config(tmp_path, snapshot_dir=small_disk / "snapshots", snapshot={"mode": "copy"})
    write_checkpoint(tmp_path / "run", 80, size=MIB)
    (small_disk / "snapshots").mkdir()
    filler = small_disk / "filler"
    filler.write_bytes(b"\1" * (63 * MIB))  # under 1 MiB left
    live = Live(cfg)
    try:
        append(cfg.metrics_file, lines(1, 100, spikes=(90,)))  # type: ignore[arg-type]
        live.wait_log(" Snapshot failed ", timeout=60)
        [snap] = own_snapshots(cfg.snapshot_dir)
        assert snap["step"] == 90 and snap["checkpoint"] is None
        assert snap["pin"]["checkpoint"] == "checkpoint-80" and "no_space" in snap["note"]
        assert not (snap["_path"] / "model").exists()
        filler.unlink()  # space comes back
        live.wait_log("Created snapshot step=90 ", timeout=90)
    finally:
        live.stop()
    [snap] = own_snapshots(cfg.snapshot_dir)
    assert snap["checkpoint"]["name"] == "checkpoint-80" and "pin" not in snap
    data = (snap["_path"] / "model" / "model.safetensors").read_bytes()
    assert data[:4] == (80).to_bytes(4, "little") and len(data) == MIB
    assert live.log().count(" Snapshot failed ") == 1


def test_fault_55_pin_still_owed_at_stop_is_made_after_a_restart(
    tmp_path: Path, small_disk: Path
) -> None:
    """The disk is still full when the monitor stops: the next start finds the snapshot
    whose pin is owed (its metadata's ``pin`` block) and makes it once there is room."""
    cfg = config(tmp_path, snapshot_dir=small_disk / "snapshots", snapshot={"mode": "copy"})
    write_checkpoint(tmp_path / "run", 80, size=MIB)
    (small_disk / "snapshots").mkdir()
    filler = small_disk / "filler"
    filler.write_bytes(b"\1" * (63 * MIB))
    live = Live(cfg)
    try:
        append(cfg.metrics_file, lines(1, 100, spikes=(90,)))  # type: ignore[arg-type]
        live.wait_log(" Snapshot failed ", timeout=60)
    finally:
        live.stop()
    filler.unlink()
    again = Live(cfg)
    try:
        again.wait_log("Created snapshot step=90 ", timeout=90)
    finally:
        again.stop()
    [snap] = own_snapshots(cfg.snapshot_dir)
    assert snap["checkpoint"]["name"] == "checkpoint-80" and "pin" not in snap
    assert (snap["_path"] / "model" / "model.safetensors").stat().st_size == MIB


# -- 56: an anomaly at a save step ------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_fault_56_anomaly_at_a_save_step_pins_the_checkpoint_before(
    tmp_path: Path, backend: str
) -> None:
    """A NaN at step 200 with checkpoint-200 complete (saved after step 200's update:
    the corrupted weights): the pin is checkpoint-100, with either backend."""
    run = tmp_path / "run"
    write_checkpoint(run, 100)
    write_checkpoint(run, 200)
    live = Live(config(tmp_path, backend))
    try:
        append(live.config.metrics_file, nan_lines(1, 210, at=200))  # type: ignore[arg-type]
        live.wait_log("Created snapshot step=200 ", timeout=60)
    finally:
        live.stop()
    [snap] = own_snapshots(live.config.snapshot_dir)
    assert snap["triggers"] == ["loss_nonfinite"]
    assert snap["checkpoint"]["name"] == "checkpoint-100"


# -- 57: a critical detection while a large copy is in flight ---------------------------
def test_fault_57_actions_never_wait_for_a_copy_and_nothing_is_copied_twice(
    tmp_path: Path, big_files: None,
) -> None:
    """A spike starts a 2 GiB copy of checkpoint-80; a NaN meanwhile: its stop file is
    written while the copy still runs (the old code waited for every copy first), and
    its snapshot of the same checkpoint shares the first copy's files."""
    stop_file = tmp_path / "STOP"
    cfg = config(
        tmp_path, snapshot={"mode": "copy"}, actions={"stop_file": {"path": str(stop_file)}}
    )
    ck = write_checkpoint(tmp_path / "run", 80)
    with open(ck / "optimizer.pt", "wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, 2 << 30)
    live = Live(cfg)
    try:
        append(cfg.metrics_file, lines(1, 100, spikes=(90,)))  # type: ignore[arg-type]
        wait_until(
            lambda: any(p.name.startswith(".tmp-") for p in cfg.snapshot_dir.iterdir()),
            "the copy to start",
            60,
        )
        append(cfg.metrics_file, nan_lines(101, 130, at=120))  # type: ignore[arg-type]
        wait_until(stop_file.exists, "the stop file", 60)
        assert "Created snapshot step=90 " not in live.log(), "the stop file waited for the copy"
        assert json.loads(stop_file.read_text())["step"] == 120
        live.wait_log("Created snapshot step=120 ", timeout=300)
    finally:
        live.stop()
    snaps = {s["step"]: s for s in own_snapshots(cfg.snapshot_dir)}
    first, second = (snaps[s]["_path"] / "model" / "optimizer.pt" for s in (90, 120))
    assert snaps[120]["checkpoint"]["name"] == "checkpoint-80"
    assert first.stat().st_ino == second.stat().st_ino, "checkpoint-80 was copied twice"


# -- 58: a snapshot folder that holds what the monitor did not make ---------------------
def test_fault_58_foreign_entries_in_snapshot_dir_are_never_touched(tmp_path: Path) -> None:
    """A snapshot_dir shared with others (as /tmp is): someone's ``.tmp-build-cache``,
    a ``job/`` with its own metadata.json and model/, an ``anomaly_*`` folder that is
    not ours. The start removes none of them and the disk budget, releasing weights
    on a small disk, never releases theirs (the old code did both)."""
    with tmpfs_mount(tmp_path / "fs", "64m") as fs:
        cfg = config(fs, watch={"reconcile_seconds": 0.5})
        snaps = cfg.snapshot_dir
        foreign = {
            snaps / ".tmp-build-cache" / "keep.txt": b"cache",
            snaps / "job" / "metadata.json": b'{"severity": "warning", "triggers": ["x"]}',
            snaps / "job" / "model" / "weights.bin": b"\2" * (3 * MIB),
            snaps / "anomaly_theirs" / "metadata.json": b'{"triggers": ["y"], "step": 1}',
            snaps / "anomaly_theirs" / "model" / "w.bin": b"\3" * MIB,
        }
        for path, data in foreign.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        run = fs / "run"
        for step in (100, 200, 300):
            write_checkpoint(run, step, size=3 * MIB)
        data = lines(1, 150, spikes=(120,)) + lines(151, 250) + line(251, float("nan"))
        append(cfg.metrics_file, data + lines(252, 350, spikes=(320,)))  # type: ignore[arg-type]
        live = Live(cfg)
        try:
            live.wait_log(" Created snapshot ", 3, timeout=60)
            for step in (100, 200, 300):  # the trainer's rotation: every pin now costs 3 MiB
                shutil.rmtree(run / f"checkpoint-{step}")
            live.wait_log(" Released snapshot ", timeout=60)
        finally:
            live.stop()
        for path, data in foreign.items():
            assert path.read_bytes() == data, f"{path} was touched"
        assert len(own_snapshots(snaps)) == 3
        assert "theirs" not in live.log() and "/job" not in live.log()
