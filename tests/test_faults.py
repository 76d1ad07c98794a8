"""Every case of FAULTS.md, by number, against the real daemon (a thread running
``Daemon``, or the ``smart-monitor run`` process where a signal or a limit is the
point), under both watch backends where the backend matters."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_harness import (
    BACKENDS,
    SMART_MONITOR,
    Live,
    append,
    config,
    kill9,
    line,
    lines,
    log_text,
    snapshots,
    spawn,
    terminate,
    wait_until,
    write_checkpoint,
    write_config_file,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from smart_monitor.sources.checkpoints import CheckpointIndex
from smart_monitor.sources.tailer import Tailer


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def deaf_observer() -> BaseObserver:
    """An observer that never reports anything in a test's lifetime: every event lost."""
    return PollingObserver(timeout=3600)


# -- the metrics file --------------------------------------------------------------
def test_fault_01_missing_file_at_start(tmp_path: Path, backend: str) -> None:
    cfg = config(tmp_path, backend, metrics_file=tmp_path / "run" / "logs" / "metrics.jsonl")
    live = Live(cfg)
    assert live.daemon._status().startswith("waiting")
    append(cfg.metrics_file, lines(1, 30))  # creates run/ and run/logs/
    live.wait_records(30)
    assert live.daemon._status().startswith("following")
    live.stop()


def test_fault_02_partial_line_waits_for_newline(tmp_path: Path, backend: str) -> None:
    cfg = config(tmp_path, backend)
    append(cfg.metrics_file, lines(1, 5))
    live = Live(cfg)
    live.wait_records(5)
    whole = line(6)
    append(cfg.metrics_file, whole[:17])
    tailer = live.daemon.tailer
    assert tailer is not None
    wait_until(lambda: tailer._read_pos() == cfg.metrics_file.stat().st_size, "the partial read")
    assert live.records == 5
    append(cfg.metrics_file, whole[17:])
    live.wait_records(6)
    live.stop()
    assert "Skipped malformed line" not in live.log()


def test_fault_03_partial_line_across_restart_completed_once(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    append(cfg.metrics_file, lines(1, 5))
    whole = line(6)
    append(cfg.metrics_file, whole[:20])
    live = Live(cfg)
    live.wait_records(5)
    live.stop()
    append(cfg.metrics_file, whole[20:])
    live = Live(cfg)
    live.wait_records(6)  # counts are restored from the state: 5 + 1
    live.stop()
    assert "Skipped malformed line" not in live.log()


def test_fault_04_unterminated_final_line_of_a_dead_trainer(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    append(cfg.metrics_file, lines(1, 5) + line(6)[:15])
    live = Live(cfg)
    live.wait_records(5)
    cfg.metrics_file.unlink()  # the run is cleaned up
    live.wait_log("Metrics file deleted")
    append(cfg.metrics_file, lines(1, 3))  # a new run
    live.wait_records(8)
    live.stop()
    assert "Dropped unterminated line" in live.log()
    assert live.daemon.errors == 0 and "Skipped malformed line" not in live.log()


def test_fault_05_truncated_in_place(tmp_path: Path, backend: str) -> None:
    cfg = config(tmp_path, backend)
    append(cfg.metrics_file, lines(1, 40))
    live = Live(cfg)
    live.wait_records(40)
    os.truncate(cfg.metrics_file, 0)
    append(cfg.metrics_file, lines(1, 3))
    live.wait_records(43)
    live.stop()
    assert "Metrics file truncated" in live.log()


def test_fault_06_truncated_and_regrown_past_offset(tmp_path: Path) -> None:
    """Same inode, more bytes than before: only the content tells (live and while down)."""
    path = tmp_path / "m.jsonl"
    append(path, lines(1, 3))
    t = Tailer(path, 1 << 20)
    assert [len(block) for _, block in t.blocks()] == [3]
    with open(path, "r+b") as fh:  # truncate and regrow between two reads
        fh.truncate(0)
        fh.write(lines(100, 110))
    assert list(t.blocks()) == [] and t.switched  # the old content is done: a boundary
    ((_, block),) = t.blocks()
    assert [json.loads(b or b"null")["step"] for b in block] == list(range(100, 111))
    t.close()
    cfg = config(tmp_path)
    append(cfg.metrics_file, lines(1, 10))
    live = Live(cfg)
    live.wait_records(10)
    live.stop()
    with open(cfg.metrics_file, "r+b") as fh:  # while the daemon is down
        fh.truncate(0)
        fh.write(lines(200, 220))
    live = Live(cfg)
    live.wait_records(31)
    live.stop()
    assert "Metrics file changed while stopped" in live.log()


def test_fault_07_copytruncate_with_stale_writer(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    cfg.metrics_file.parent.mkdir(parents=True)
    fd = os.open(cfg.metrics_file, os.O_WRONLY | os.O_CREAT)  # no O_APPEND
    try:
        os.write(fd, lines(1, 20))
        live = Live(cfg)
        live.wait_records(20)
        shutil.copyfile(cfg.metrics_file, tmp_path / "metrics.jsonl.1")
        os.truncate(cfg.metrics_file, 0)
        os.write(fd, lines(21, 30))  # lands at the old offset: a NUL hole before it
    finally:
        os.close(fd)
    live.wait_records(30)
    live.stop()
    assert b"\0" * 100 in cfg.metrics_file.read_bytes()
    assert "Skipped NUL bytes" in live.log()
    assert "Skipped malformed line" not in live.log()


def test_fault_08_replaced_by_rename(tmp_path: Path, backend: str) -> None:
    cfg = config(tmp_path, backend)
    append(cfg.metrics_file, lines(1, 10))
    live = Live(cfg)
    live.wait_records(10)
    append(cfg.metrics_file, lines(11, 12))  # the old file's last lines, then the swap
    new = tmp_path / "run" / "metrics.jsonl.new"
    append(new, lines(13, 20))
    os.replace(new, cfg.metrics_file)
    live.wait_records(20)
    live.stop()
    assert "Metrics file replaced" in live.log()


def test_fault_09_deleted_and_recreated(tmp_path: Path, backend: str) -> None:
    cfg = config(tmp_path, backend)
    append(cfg.metrics_file, lines(1, 10))
    live = Live(cfg)
    live.wait_records(10)
    cfg.metrics_file.unlink()
    live.wait_log("Metrics file deleted")
    append(cfg.metrics_file, lines(1, 4))
    live.wait_records(14)
    live.stop()
    assert "Metrics file replaced" in live.log()


def test_fault_10_malformed_lines_are_counted_and_passed(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    bad = [b"garbage", b'{"step": 3, "loss": 1.', b'{"step": "x", "loss": []}', b"[1, 2]",
           b'{"loss": 1.0, "loss": 2.0, "step": 4}', b'{"loss": 0.5}']
    append(cfg.metrics_file, lines(1, 2) + b"\n".join(bad) + b"\n" + lines(5, 6))
    live = Live(cfg)
    wait_until(lambda: live.daemon.engine.counts["malformed"] >= 3, "malformed counted")
    wait_until(lambda: live.daemon.tailer is not None and live.daemon.tailer.offset
               == cfg.metrics_file.stat().st_size, "the whole file read")
    live.stop()
    counts = live.daemon.engine.counts
    assert counts["records"] + counts["malformed"] >= 4 + 3
    assert live.log().count("Skipped malformed line") == counts["malformed"]
    assert live.daemon.errors == 0


def test_fault_11_nan_and_infinity_tokens(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    append(cfg.metrics_file, lines(1, 30) + b'{"step": 31, "loss": NaN, "grad_norm": Infinity}\n')
    live = Live(cfg)
    live.wait_log("Created snapshot")
    live.stop()
    assert "Skipped malformed line" not in live.log()
    assert any("loss_nonfinite" in t for s in snapshots(live.out) for t in s["triggers"])


def test_fault_12_bom_crlf_invalid_utf8_empty_lines(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    data = (b"\xef\xbb\xbf" + line(1).replace(b"\n", b"\r\n") + b"\n\r\n"
            + line(2)[:-2] + b', "note": "caf\xe9"}\n' + lines(3, 4))
    append(cfg.metrics_file, data)
    live = Live(cfg)
    live.wait_records(4)
    live.stop()
    assert "Skipped malformed line" not in live.log()


def test_fault_13_huge_line_bounded(tmp_path: Path) -> None:
    cfg = config(tmp_path, records={"max_line_bytes": 1 << 20})
    append(cfg.metrics_file, lines(1, 3) + b'{"x": "' + b"a" * (20 << 20) + b'"}\n' + lines(4, 5))
    live = Live(cfg)
    live.wait_records(5)
    live.stop()
    assert live.daemon.engine.counts["malformed"] == 1
    assert "reason=oversized" in live.log()


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[str, int]] = []  # (message, records processed then)
        self.records = lambda: 0
        self.running = True
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while self.running:
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.messages.append((msg, self.records()))

    def close(self) -> None:
        self.running = False
        self.thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_fault_14_backlog_ready_and_watchdog_before_it_is_done(
    tmp_path: Path, notify_socket: NotifyListener
) -> None:
    cfg = config(tmp_path, detectors={"best_model": {"enabled": False}})
    n = 150_000
    append(cfg.metrics_file, lines(1, n))
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "100000"}
    # the daemon's clock runs 20x: its 0.25 s turns and the pings are 12.5 ms apart, so
    # the backlog spans several turns however fast this machine reads it
    start = time.monotonic()
    live = Live(cfg, env, clock=lambda: start + 20 * (time.monotonic() - start))
    notify_socket.records = lambda: live.records
    live.wait_records(n, timeout=120)
    wait_until(lambda: any("READY=1" in m for m, _ in notify_socket.messages), "READY=1")
    live.stop()
    wait_until(lambda: any("STOPPING=1" in m for m, _ in notify_socket.messages), "STOPPING=1")
    msgs = notify_socket.messages
    ready = next(r for m, r in msgs if "READY=1" in m)
    pings = [r for m, r in msgs if m == "WATCHDOG=1"]
    assert ready < n  # READY after state recovery, not after the backlog
    assert sum(1 for r in pings if r < n) >= 2  # pings keep coming through the backlog


def test_fault_15_steps_go_backwards(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    append(cfg.metrics_file, lines(1, 100, spikes=(80,)))
    live = Live(cfg)
    live.wait_log("Created snapshot")
    append(cfg.metrics_file, lines(51, 120, spikes=(110,)))  # resumed from checkpoint-50
    live.wait_records(170)
    live.wait_log("Created snapshot", 2)
    live.stop()
    assert "Trainer restarted" in live.log()
    keys = [s["key"] for s in snapshots(live.out)]
    assert len(keys) == len(set(keys)) == 2


# -- the daemon's own state ---------------------------------------------------------
def test_fault_16_sigkill_before_commit_reprocesses_idempotently(tmp_path: Path) -> None:
    cfg = config(tmp_path, state={"save_interval_seconds": 3600})  # no save but on stop
    conf = write_config_file(cfg, tmp_path / "sm.toml")
    append(cfg.metrics_file, lines(1, 100, spikes=(90,)))
    proc = spawn(conf, tmp_path / "err")
    out = tmp_path / "out"
    wait_until(lambda: "Created snapshot" in log_text(out), "the snapshot")
    kill9(proc)
    proc = spawn(conf, tmp_path / "err")
    wait_until(lambda: log_text(out).count(" Started ") == 2, "the restart")
    wait_until(lambda: "Detected anomaly step=90 " in log_text(out).split(" Started ")[-1],
               "the anomaly seen again")
    assert terminate(proc) == 0
    assert "state=fresh" in log_text(out).split(" Started ")[-1]  # killed before any save
    assert len(snapshots(out)) == 1


def test_fault_17_state_file_torn_falls_back(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    append(cfg.metrics_file, lines(1, 100, spikes=(90,)))
    live = Live(cfg)
    live.wait_log("Created snapshot")
    live.stop()
    for name in ("state.json", "state.json.prev"):
        p = cfg.state_dir / name
        if p.exists():
            p.write_bytes(b"\0" * p.stat().st_size)
    live = Live(cfg)
    live.wait_records(100)  # rebuilt from offset 0
    live.stop()
    assert "state=fresh" in live.log()
    assert len(snapshots(live.out)) == 1  # the done-set came from the snapshots


def test_fault_18_monotonic_clock_and_step_order(tmp_path: Path) -> None:
    """Waits and quiet periods run on the monotonic clock; checkpoints are ordered by
    step, never by mtime (a clock jump makes mtimes lie)."""
    run = tmp_path / "run"
    old, new = write_checkpoint(run, 100), write_checkpoint(run, 200)
    os.utime(old, (2e9, 2e9))  # "newer" by mtime
    os.utime(new, (1e9, 1e9))
    cfg = config(tmp_path)
    live = Live(cfg)
    live.stop()
    assert live.daemon.clock is time.monotonic
    index = CheckpointIndex(run, cfg.checkpoints)
    index.scan()
    ck = index.newest_at_or_before(250)
    assert ck is not None and ck.step == 200


# -- watching ------------------------------------------------------------------------
def test_fault_19_inotify_limit_falls_back_to_polling(tmp_path: Path) -> None:
    def exhausted() -> BaseObserver:  # what inotify_add_watch raises at max_user_watches
        raise OSError(errno.ENOSPC, "inotify watch limit reached")

    cfg = config(tmp_path, "auto")
    live = Live(cfg, factory=exhausted)
    append(cfg.metrics_file, lines(1, 10))
    live.wait_records(10)
    assert live.daemon.watcher.kind == "polling"
    assert live.daemon._status().startswith("degraded")
    live.stop()
    assert "Inotify unavailable, polling instead" in live.log() and "sysctl" in live.log()


def test_fault_20_lost_events_caught_by_reconciliation(tmp_path: Path) -> None:
    cfg = config(tmp_path, watch={"reconcile_seconds": 0.2})
    live = Live(cfg, factory=deaf_observer)
    for step in range(10, 60, 10):
        write_checkpoint(tmp_path / "run", step)
    append(cfg.metrics_file, lines(1, 50))
    live.wait_records(50)
    live.wait_log("Checkpoint complete", 5)
    live.stop()


# -- checkpoints ---------------------------------------------------------------------
def test_fault_21_checkpoint_not_used_before_complete(tmp_path: Path, backend: str) -> None:
    cfg = config(tmp_path, backend)
    run = tmp_path / "run"
    write_checkpoint(run, 40)
    write_checkpoint(run, 80, marker=False)  # still being written
    live = Live(cfg)
    live.wait_log("Checkpoint complete", 1)
    append(cfg.metrics_file, lines(1, 100, spikes=(90,)))
    live.wait_log("Created snapshot")
    (run / "checkpoint-80" / "trainer_state.json").write_text('{"global_step": 80}')
    live.wait_log("Checkpoint complete", 2)
    live.stop()
    [snap] = snapshots(live.out)
    assert snap["checkpoint"]["name"] == "checkpoint-40"


def test_fault_22_checkpoint_rotated_away(tmp_path: Path) -> None:
    """The trainer deleted the newest checkpoint: the snapshot pins the newest that is
    still there, whole, and leaves no temporary behind."""
    cfg = config(tmp_path, watch={"reconcile_seconds": 0.2})
    run = tmp_path / "run"
    write_checkpoint(run, 40)
    write_checkpoint(run, 80)
    live = Live(cfg, factory=deaf_observer)
    live.wait_log("Checkpoint complete", 2)
    shutil.rmtree(run / "checkpoint-80")
    append(cfg.metrics_file, lines(1, 100, spikes=(90,)))
    live.wait_log("Created snapshot")
    live.stop()
    [snap] = snapshots(live.out)
    assert snap["checkpoint"]["name"] == "checkpoint-40"
    weights = (snap["_path"] / "model" / "model.safetensors").read_bytes()
    assert weights[:4] == (40).to_bytes(4, "little")


def test_fault_23_checkpoint_rewritten_in_place(tmp_path: Path) -> None:
    """With copies (or reflinks) a snapshot does not change when the trainer re-saves."""
    cfg = config(tmp_path, snapshot={"mode": "copy"})
    run = tmp_path / "run"
    write_checkpoint(run, 80)
    live = Live(cfg)
    append(cfg.metrics_file, lines(1, 100, spikes=(90,)))
    live.wait_log("Created snapshot")
    live.stop()
    with open(run / "checkpoint-80" / "model.safetensors", "r+b") as fh:
        fh.write(b"XXXX")  # the trainer re-saves into the same file
    [snap] = snapshots(live.out)
    weights = (snap["_path"] / "model" / "model.safetensors").read_bytes()
    assert weights[:4] == (80).to_bytes(4, "little")


def test_fault_24_disk_full_during_snapshot(tmp_path: Path) -> None:
    """A copy that cannot be written (here: a file size limit, EFBIG; ENOSPC takes the
    same path) is abandoned whole: no partial ``model/``, no temporary, the daemon goes
    on; the anomaly keeps its metadata-only snapshot saying so (FAULTS.md #55)."""
    cfg = config(tmp_path, snapshot={"mode": "copy"})
    conf = write_config_file(cfg, tmp_path / "sm.toml")
    write_checkpoint(tmp_path / "run", 80, size=4 << 20)

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = spawn(conf, tmp_path / "err", preexec_fn=limit)
    append(cfg.metrics_file, lines(1, 100, spikes=(90,)))
    out = tmp_path / "out"
    wait_until(lambda: "Snapshot failed" in log_text(out), "the failure")
    append(cfg.metrics_file, lines(101, 110))
    assert terminate(proc) == 0
    [snap] = snapshots(out)  # the evidence stays (case 55): metadata, no partial model/
    assert snap["checkpoint"] is None and not (snap["_path"] / "model").exists()
    assert snap["pin"]["checkpoint"] == "checkpoint-80" and "could not be pinned" in snap["note"]
    assert [p.name for p in (out / "snapshots").iterdir()] == [snap["_path"].name]
    assert "Stopped" in log_text(out)


def test_fault_25_killed_mid_snapshot_leftovers_removed(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    left = cfg.snapshot_dir / ".tmp-0123456789ab"
    (left / "model").mkdir(parents=True)
    (left / "model" / "model.safetensors").write_bytes(b"half")
    live = Live(cfg)
    live.stop()
    assert not left.exists()
    assert "Removed unfinished snapshot" in live.log()


def test_fault_26_other_file_system_and_existing_name(tmp_path: Path) -> None:
    shm = Path("/dev/shm")  # a tmpfs on every Linux machine: another file system
    assert os.stat(shm).st_dev != os.stat(tmp_path).st_dev, "the test needs two file systems"
    ck_root = Path(tempfile.mkdtemp(dir=shm))
    try:
        write_checkpoint(ck_root, 20)
        cfg = config(tmp_path, checkpoint_dir=ck_root)
        cfg.snapshot_dir.mkdir(parents=True)
        now = time.time()
        taken = [
            cfg.snapshot_dir / time.strftime(f"anomaly_%Y%m%d_%H%M%S_{t}", time.gmtime(now + d))
            for d in range(0, 30) for t in ("MULTIPLE_TRIGGERS", "loss_nonfinite")
        ]
        for p in taken:
            p.mkdir()  # empty: a rename onto it would succeed silently
        live = Live(cfg)
        append(cfg.metrics_file, lines(1, 30) + b'{"step": 31, "loss": NaN}\n')
        live.wait_log("Created snapshot")
        live.stop()
        for p in taken:
            p.rmdir()  # still empty: nothing was renamed onto them
        [snap] = snapshots(live.out)
        assert snap["checkpoint"]["mode"] == "copy"  # EXDEV: no link across file systems
        base, suffix = snap["_path"].name.rsplit("_", 1)
        assert suffix.isdigit() and cfg.snapshot_dir / base in taken
    finally:
        shutil.rmtree(ck_root, ignore_errors=True)


def test_fault_27_snapshot_dir_in_trainer_glob_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        f'checkpoint_dir = "{tmp_path}/run"\nsnapshot_dir = "{tmp_path}/run/checkpoint-snaps"\n'
    )
    r = subprocess.run(
        [str(SMART_MONITOR), "run", "--config", str(bad)], capture_output=True, timeout=60
    )
    assert r.returncode == 2 and b"snapshot_dir" in r.stderr
    cfg = config(tmp_path)  # and nothing is ever written into the trainer's folder
    write_checkpoint(tmp_path / "run", 80)
    append(cfg.metrics_file, lines(1, 100, spikes=(90,)))
    def listing() -> list[tuple[Path, int]]:
        return sorted((p, p.stat().st_mtime_ns) for p in (tmp_path / "run").rglob("*"))

    before = listing()
    live = Live(cfg)
    live.wait_log("Created snapshot")
    live.stop()
    assert listing() == before


def test_fault_28_watched_root_deleted_and_recreated(tmp_path: Path, backend: str) -> None:
    cfg = config(tmp_path, backend)
    run = tmp_path / "run"
    write_checkpoint(run, 10)
    append(cfg.metrics_file, lines(1, 20))
    live = Live(cfg)
    live.wait_records(20)
    shutil.rmtree(run)
    wait_until(lambda: "Metrics file deleted" in live.log(), "the deletion noticed")
    write_checkpoint(run, 30)
    append(cfg.metrics_file, lines(1, 40))
    live.wait_records(60)
    live.wait_log("Checkpoint complete name=checkpoint-30")
    live.stop()


def test_fault_29_dead_observer_restarted_and_worker_errors_counted(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    append(cfg.metrics_file, lines(1, 10))
    live = Live(cfg)
    live.wait_records(10)
    observer = live.daemon.watcher._observer
    assert observer is not None
    observer.stop()  # as an exception in its thread would leave it
    observer.join()
    append(cfg.metrics_file, lines(11, 20))  # the reconcile is a minute away: only a
    live.daemon.wakeups.post("tick")         # restarted observer can bring these in
    live.wait_log("Observer died, restarting it")
    append(cfg.metrics_file, lines(21, 30))
    live.wait_records(30)
    shutil.rmtree(cfg.state_dir)
    cfg.state_dir.write_text("not a folder")  # every save fails now: degraded (case 33)
    append(cfg.metrics_file, lines(31, 40))
    live.wait_log("State save failed")
    cfg.state_dir.unlink()
    append(cfg.metrics_file, lines(41, 50))
    live.wait_records(50)
    live.wait_log("State saved again")
    assert (cfg.state_dir / "state.json").exists()
    read, failures = live.daemon._read, [RuntimeError("a bug in one turn")]

    def read_once_broken() -> None:
        if failures:
            raise failures.pop()
        read()

    live.daemon._read = read_once_broken  # type: ignore[method-assign]  # the fault itself
    append(cfg.metrics_file, lines(51, 60))
    live.wait_log("Worker error")
    live.wait_records(60)  # the next turn reads what the broken one left
    live.stop()
    assert live.daemon.errors == 1


def test_fault_30_remote_writer_polling_and_escaping_symlink(tmp_path: Path) -> None:
    """Polling sees a writer that raises no event (another node); a link inside a
    checkpoint pointing out of it is not kept (it would dangle after rotation)."""
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(b"secret")
    run = tmp_path / "run"
    ck = write_checkpoint(run, 80)
    (ck / "link.bin").symlink_to(outside)
    cfg = config(tmp_path, "polling")
    live = Live(cfg)
    append(cfg.metrics_file, lines(1, 100, spikes=(90,)))
    live.wait_log("Created snapshot")
    live.stop()
    [snap] = snapshots(live.out)
    model = snap["_path"] / "model"
    assert (model / "model.safetensors").is_file() and not (model / "link.bin").exists()
