"""FAULTS.md cases 59, 60 and 62-66 (the third ring's edges): finite extremes, a hole
in an event file, config values at the edge, a stop whose steps fail, a log disk that
fills, thousands of snapshots, and a snapshot rewritten behind ``verify``'s back. Each
runs the real command under the default config, on real logs where a run's shape
matters (../shared/real-runs/dev)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from live_harness import (
    SMART_MONITOR,
    Live,
    append,
    config,
    line,
    lines,
    log_text,
    snapshots,
    spawn,
    terminate,
    tmpfs_mount,
    wait_until,
    write_checkpoint,
    write_config_file,
)
from test_faults_config import NOBODY, cli, one_line_exit_2
from test_faults_disk import fill
from test_faults_worker import Hook, nan_lines
from test_faults_worker import hook as hook  # the fixture, for this module's tests

DEV = Path(__file__).parents[1].parent / "shared" / "real-runs" / "dev"
LSTM = DEV / "pypi-data__pypi-mirror-359__nlpia2_LSTM_2l_12ep.jsonl"


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def replay(metrics: Path, out: Path) -> str:
    res = subprocess.run(
        [str(SMART_MONITOR), "replay", "--metrics", str(metrics), "--output", str(out),
         "--no-plots"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "Warning" not in res.stderr, res.stderr
    return log_text(out)


def events(log: str, text: str) -> list[str]:
    return [x for x in log.splitlines() if f" {text} " in x]


def write(path: Path, recs: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def triggers(log: str) -> list[str]:
    """``step=S trigger=T`` of every detection."""
    return [" ".join(x.split(" Detected anomaly ")[1].split()[:2])
            for x in events(log, "Detected anomaly")]


# -- 59: finite extremes ----------------------------------------------------------------
def test_fault_59_finite_extremes_poison_no_window(tmp_path: Path) -> None:
    """loss -1e308 and +1e308, eval_loss -1e308, and a step jump of 1e18 in a real run:
    each extreme loss is a critical anomaly of its own, and every other detection is
    the one the unmodified run gives: no window poisoned (no nan z, no numpy overflow
    warning), best-model tracking goes on past the absurd eval loss."""
    recs = records(LSTM)
    train = [i for i, r in enumerate(recs) if "loss" in r]
    evals = [i for i, r in enumerate(recs) if "eval_loss" in r]
    neg, pos, ev = train[60], train[100], evals[4]
    base = triggers(replay(LSTM, tmp_path / "base"))
    edited = [dict(r) for r in recs]
    edited[neg]["loss"], edited[pos]["loss"] = -1e308, 1e308
    edited[ev]["eval_loss"] = -1e308
    got = triggers(replay(write(tmp_path / "extremes.jsonl", edited), tmp_path / "out"))
    bad = [f"step={recs[i]['step']} trigger=loss_nonfinite" for i in (neg, pos)]
    # best models fire thinned within a burst of improvements (1st, 2nd, 4th, ...): the
    # absurd eval, left out, shifts which of a burst fire; every other detection is equal
    assert [t for t in got if t not in bad and "best_model" not in t] == [
        t for t in base if "best_model" not in t]
    assert all(got.count(t) == 1 for t in bad)
    assert any(f"step={r['step']} trigger=best_model" in t
               for r in recs[ev + 1:] for t in got), "a best model after the bad eval"
    jump = [dict(r, step=r["step"] + (10**18 if i >= train[80] else 0))
            for i, r in enumerate(recs)]
    moved = triggers(replay(write(tmp_path / "jump.jsonl", jump), tmp_path / "jumped"))
    assert [t.split()[1] for t in moved] == [t.split()[1] for t in base]
    assert not any("nan" in t for t in got + moved)


def write_events(folder: Path, recs: list[dict[str, Any]]) -> Path:
    """``recs`` as one event file, as HF's TensorBoard callback names the keys."""
    from torch.utils.tensorboard import SummaryWriter

    tags = {"loss": "train/loss", "learning_rate": "train/learning_rate",
            "grad_norm": "train/grad_norm", "epoch": "train/epoch", "eval_loss": "eval/loss"}
    w = SummaryWriter(str(folder))
    for r in recs:
        for key, value in r.items():
            if key != "step" and isinstance(value, float | int):
                w.add_scalar(tags.get(key, key), value, r["step"])
    w.close()
    (path,) = folder.glob("events.out.tfevents.*")
    return path


def record_offsets(data: bytes) -> list[int]:
    """Where each record of an event file starts (length, CRC, data, CRC)."""
    at, out = 0, []
    while at < len(data):
        out.append(at)
        at += 16 + int.from_bytes(data[at:at + 8], "little")
    return out


def test_fault_60_bad_crc_resyncs_and_a_later_nan_is_caught(tmp_path: Path) -> None:
    """A bit flip in one record and a NUL hole in another, both before a NaN loss: each
    hole is counted once, the records after it are read, and the NaN is detected."""
    recs = [r for r in records(LSTM) if "loss" in r]
    nan_step = recs[len(recs) * 3 // 4]["step"]
    for r in recs:
        if r["step"] == nan_step:
            r["loss"] = float("nan")
    path = write_events(tmp_path / "run", recs)
    data = bytearray(path.read_bytes())
    starts = record_offsets(bytes(data))
    flip, hole = starts[len(starts) // 4], starts[len(starts) // 2]
    data[flip + 20] ^= 0xFF  # a bit flip in one record's data
    data[hole:starts[starts.index(hole) + 3]] = bytes(starts[starts.index(hole) + 3] - hole)
    path.write_bytes(bytes(data))
    log = replay(tmp_path / "run", tmp_path / "out")
    bad = events(log, "Skipped malformed line")
    assert len(bad) == 2 and all("reason=crc_mismatch" in x for x in bad), log
    assert f"offset={flip}" in bad[0] and f"offset={hole}" in bad[1]
    (nan,) = [x for x in events(log, "Detected anomaly") if "loss_nonfinite" in x]
    assert f"step={nan_step} " in nan
    (snap,) = [m for m in snapshots(tmp_path / "out") if m["triggers"] == ["loss_nonfinite"]]
    assert snap["step"] == nan_step


# -- 62: config values at the edge -----------------------------------------------------
def _paths(tmp_path: Path) -> str:
    metrics = tmp_path / "run" / "metrics.jsonl"
    append(metrics, lines(1, 5))
    out = tmp_path / "out"
    return f'metrics_file = "{metrics}"\n' + "".join(
        f'{k} = "{out / k}"\n' for k in ("snapshot_dir", "log_dir", "state_dir"))


@pytest.mark.parametrize(
    ("toml", "key", "allowed"),
    [
        ("[policy]\nhistory = 1e20\n", "policy.history", "1 <= history <= 100000"),
        ("[policy]\nrecent_examples = 1e20\n", "policy.recent_examples",
         "0 <= recent_examples <= 1000"),
        ("[detectors.loss_zscore]\nwindow = 1e20\n", "detectors.loss_zscore.window",
         "2 <= window <= 100000"),
        ("[watch]\npoll_interval = 1e-9\n", "watch.poll_interval",
         "0.01 <= poll_interval <= 86400"),
        ("[snapshot]\nmax_bytes = 1e300\n", "snapshot.max_bytes", "0 <= max_bytes <= "),
    ],
)
def test_fault_62_numbers_out_of_range_exit_2_naming_key_and_range(
    tmp_path: Path, toml: str, key: str, allowed: str
) -> None:
    cfg = tmp_path / "edge.toml"
    cfg.write_text(_paths(tmp_path) + toml)
    for args in (("check-config", cfg), ("run", "--config", cfg)):
        one_line_exit_2(cli(*args), key, f"allowed: {allowed}")
    assert not (tmp_path / "out").exists()


def test_fault_62_utf8_bom_is_accepted_by_check_config_and_run(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    append(cfg.metrics_file, lines(1, 30) + line(31, float("nan")))  # type: ignore[arg-type]
    path = write_config_file(cfg, tmp_path / "bom.toml")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())  # as Notepad saves UTF-8
    res = cli("check-config", path)
    assert res.returncode == 0 and ": ok " in res.stdout, res.stderr
    proc = spawn(path, tmp_path / "stderr")
    try:
        wait_until(lambda: "trigger=loss_nonfinite" in log_text(tmp_path / "out")
                   or proc.poll() is not None, "the NaN detected by run")
    finally:
        assert terminate(proc) == 0, (tmp_path / "stderr").read_text()


def test_fault_62_metrics_file_a_folder_is_read(tmp_path: Path) -> None:
    """A folder holding the trainer's JSONL (LLaMA-Factory writes trainer_log.jsonl in
    its output folder): run and replay both read it, and its NaN is caught."""
    folder = tmp_path / "run"
    append(folder / "trainer_log.jsonl", lines(1, 30) + line(31, float("nan")))
    cfg = config(tmp_path, metrics_file=folder)
    res = cli("check-config", write_config_file(cfg, tmp_path / "c.toml"))
    assert res.returncode == 0, res.stderr
    log = replay(folder, tmp_path / "replayed")
    assert "step=31 trigger=loss_nonfinite" in log, log
    proc = spawn(tmp_path / "c.toml", tmp_path / "stderr")
    try:
        wait_until(lambda: "step=31 trigger=loss_nonfinite" in log_text(tmp_path / "out")
                   or proc.poll() is not None, "the NaN detected by run")
    finally:
        assert terminate(proc) == 0, (tmp_path / "stderr").read_text()


def test_fault_62_an_empty_config_file_is_the_defaults(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_bytes(b"")
    res = subprocess.run([str(SMART_MONITOR), "check-config", str(empty)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0 and "metrics_file=None" in res.stdout, res.stderr
    one_line_exit_2(subprocess.run(
        [str(SMART_MONITOR), "run", "--config", str(empty)], cwd=tmp_path,
        capture_output=True, text=True, timeout=120, check=False), "metrics_file: required")




@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A folder ``nobody`` can reach (pytest's tmp_path is root's, mode 0700)."""
    assert shutil.which("setpriv") and os.geteuid() == 0, "a second user needs root"
    root = Path(tempfile.mkdtemp(prefix="smart-monitor-edges-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("what", ["file", "folder"])
def test_fault_62_unreadable_metrics_same_verdict_from_check_config_and_run(
    shared_root: Path, what: str
) -> None:
    run = shared_root / "run"
    metrics = run / "metrics.jsonl"
    append(metrics, lines(1, 5))
    out = shared_root / "out"
    out.mkdir()
    os.chown(out, 65534, 65534)
    run.chmod(0o755)
    target = metrics if what == "file" else run
    target.chmod(0o600 if what == "file" else 0o700)  # a trainer with umask 077
    cfg = shared_root / "c.toml"
    cfg.write_text(f'metrics_file = "{target}"\n' + "".join(
        f'{k} = "{out / k}"\n' for k in ("snapshot_dir", "log_dir", "state_dir")))
    cfg.chmod(0o644)
    why = "cannot be read" if what == "file" else "cannot be listed"
    for args in (("check-config", cfg), ("run", "--config", cfg)):
        one_line_exit_2(cli(*args, user=NOBODY), "metrics_file", str(target), why)


# -- 66: a published snapshot rewritten with its mtime put back -------------------------
def test_fault_66_rewrite_with_mtime_restored_is_caught_and_missing_exits_2(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    ck = write_checkpoint(run, 80, size=1 << 20)
    append(run / "metrics.jsonl", lines(1, 100, spikes=(90,)))
    res = subprocess.run([str(SMART_MONITOR), "replay", "--metrics", str(run / "metrics.jsonl"),
                          "--checkpoints", str(run), "--output", str(tmp_path / "out"),
                          "--no-plots"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    [snap] = [m for m in snapshots(tmp_path / "out") if m["step"] == 90]
    assert snap["checkpoint"]["mode"] == "hardlink"

    def verify(name: str | Path) -> subprocess.CompletedProcess[str]:
        return cli("verify", name, "--output", tmp_path / "out")

    weights = ck / "model.safetensors"
    os.link(weights, run / "extra-link")  # the inode's ctime moves, its bytes do not:
    (run / "extra-link").unlink()  # as when the trainer's rotation unlinks its copy
    ok = verify(snap["_path"])
    assert ok.returncode == 0 and "intact" in ok.stdout, ok.stdout + ok.stderr
    st = weights.stat()
    with open(weights, "r+b") as fh:  # new weights into the same file, mid-file
        fh.seek(st.st_size // 2)
        fh.write(os.urandom(1 << 16))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # touch -r: mtime put back
    assert weights.stat().st_mtime_ns == st.st_mtime_ns
    bad = verify(snap["_path"].name)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "changed model.safetensors: rewritten (content changed, mtime put back)" in bad.stdout
    missing = verify("anomaly_20260101_000000_loss_nonfinite")
    one_line_exit_2(missing, "no such snapshot", "anomaly_20260101_000000_loss_nonfinite")


# -- 64: the log disk fills and frees while anomalies arrive ----------------------------
def leave_slack(path: Path, free: int) -> None:
    """On a full tmpfs a file still grows into its last page: fill that page up to
    ``free`` bytes (blank lines, which every reader skips)."""
    size = path.stat().st_size
    page = -(-size // 4096) * 4096
    if page - size <= free:
        page += 4096
    with open(path, "ab", buffering=0) as fh:
        fh.write(b"\n" * (page - size - free))


def test_fault_64_full_log_disk_no_torn_line_json_stays_json_and_stats_counts(
    tmp_path: Path,
) -> None:
    """JSON log on a small file system that fills while a spike and a NaN arrive: the
    file never holds a torn line (the disk fills mid-line: the part that landed is cut
    off), the ``Log file resumed`` line is JSON too, and ``stats`` counts the critical
    NaN whose ``Created snapshot`` line was lost, from the snapshot's metadata."""
    with tmpfs_mount(tmp_path / "fs", "4m") as fs:
        cfg = config(tmp_path, log_dir=fs / "logs", log_format="json")
        append(cfg.metrics_file, lines(1, 50))  # type: ignore[arg-type]
        path = write_config_file(cfg, tmp_path / "c.toml")
        proc = spawn(path, tmp_path / "stderr")
        err = tmp_path / "stderr"
        try:
            wait_until(lambda: '"Started"' in err.read_text(), "Started")
            filler = fill(fs)
            (log_file,) = (fs / "logs").glob("*.log")
            leave_slack(log_file, 100)  # the next line that is longer is cut short
            append(cfg.metrics_file,  # type: ignore[arg-type]
                   lines(51, 150, spikes=(120,)) + line(151, float("nan")))
            wait_until(lambda: '"step":151,"triggers"' in err.read_text(), "the NaN's snapshot")
            filler.unlink()
            append(cfg.metrics_file, lines(152, 400, spikes=(380,)))  # type: ignore[arg-type]
            wait_until(lambda: "Log file resumed" in log_file.read_text(), "the log resumed")
        finally:
            assert terminate(proc) == 0, err.read_text()[-2000:]
        text = "".join(p.read_text() for p in (fs / "logs").glob("*.log"))
        events = [json.loads(x) for x in text.splitlines() if x.strip()]  # no torn line
        (resumed,) = [e for e in events if e["event"] == "Log file resumed"]
        assert resumed["lost"] > 0 and resumed["level"] == "warning"
        nan_logged = any(e["event"] == "Created snapshot" and e.get("step") == 151
                         for e in events)
        assert not nan_logged, text
        res = cli("stats", "--config", path)
        assert res.returncode == 0, res.stderr
        assert "loss_nonfinite (good!)" not in res.stdout, res.stdout
        assert "      1 loss_nonfinite" in res.stdout.splitlines(), res.stdout
        assert "not in the log (lines lost)" in res.stdout


# -- 63: SIGTERM while forensic scans are pending, or while finish raises ---------------
def test_fault_63_stop_within_deadline_with_a_scan_stuck_and_state_saved(
    tmp_path: Path,
) -> None:
    """A checkpoint of 1 TiB of weights (sparse: the scan reads zeros for hours, as it
    would read a slow network mount) under the optional weight scan: SIGTERM stops the
    monitor well inside systemd's TimeoutStopSec (60 s), says which scan it gave up on,
    and saves its state."""
    cfg = config(tmp_path, checkpoint_scan={"enabled": True})
    ck = tmp_path / "run" / "checkpoint-40"
    ck.mkdir(parents=True)
    count = 1 << 38  # float32s: 1 TiB
    header = json.dumps({"w": {"dtype": "F32", "shape": [count],
                               "data_offsets": [0, 4 * count]}}).encode()
    with open(ck / "model.safetensors", "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + 4 * count)
    (ck / "trainer_state.json").write_text('{"global_step": 40}')
    append(cfg.metrics_file, lines(1, 50))  # type: ignore[arg-type]
    err = tmp_path / "stderr"
    proc = spawn(write_config_file(cfg, tmp_path / "c.toml"), err)
    try:
        wait_until(lambda: "Checkpoint complete name=checkpoint-40" in err.read_text()
                   and " records=" not in err.read_text(), "the scan under way")
        wait_until(lambda: (tmp_path / "out" / "state" / "state.json").is_file(), "a save")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        (ck / "model.safetensors").unlink()
    log = err.read_text()
    assert code == 0, log[-2000:]
    assert took < 60, f"stopped {took:.1f} s after SIGTERM"
    assert "Checkpoint scans abandoned at stop count=1 names=checkpoint-40" in log, log
    state = json.loads((tmp_path / "out" / "state" / "state.json").read_text())
    assert state["data"]["engine"]["counts"]["records"] == 50


def test_fault_63_a_failing_finish_still_saves_the_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier step of the stop raising (finish: the snapshots still waiting) does
    not skip the final state save: a restart resumes, it does not read everything."""
    cfg = config(tmp_path)
    append(cfg.metrics_file, lines(1, 40))  # type: ignore[arg-type]
    live = Live(cfg)
    live.wait_records(40)

    def broken(**_: Any) -> None:
        raise RuntimeError("dispatch flush failed")

    monkeypatch.setattr(live.daemon.engine, "finish", broken)
    saves = []
    monkeypatch.setattr(live.daemon.store, "save", lambda data: saves.append(data))
    live.daemon.stop()
    live.thread.join(20)
    assert not live.thread.is_alive() and live.error is None
    failed = 'Stop step failed step=finish error="RuntimeError: dispatch flush failed"'
    assert failed in live.log()
    assert saves and saves[-1]["engine"]["counts"]["records"] == 40


# -- the tailer's offset moves past a block once the block is handled -------------------
def test_a_block_whose_handling_failed_is_read_again_not_lost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A turn that fails while handling a block of lines (a worker error) leaves the
    tailer's offset before that block: the next turn handles it, and the NaN in it is
    caught; the state saved in between resumes before it too."""
    cfg = config(tmp_path)
    append(cfg.metrics_file, lines(1, 30))  # type: ignore[arg-type]
    live = Live(cfg)
    live.wait_records(30)
    ingest = live.daemon.engine.ingest
    real, failed = ingest.handle_lines, []

    def flaky(lines: Any, offset: int) -> None:
        if not failed:
            failed.append(offset)
            assert live.daemon.tailer is not None
            saved = live.daemon.tailer.state_dict()["offset"]
            assert saved == offset, "the offset moved past a block not yet handled"
            raise OSError("a transient failure while handling")
        real(lines, offset)

    monkeypatch.setattr(ingest, "handle_lines", flaky)
    append(cfg.metrics_file, lines(31, 35) + line(36, float("nan")))  # type: ignore[arg-type]
    live.wait_log("trigger=loss_nonfinite")
    live.stop()
    assert failed and live.log().count("Worker error") == 1
    assert live.records == 36


# -- a webhook in retry backoff at stop is said to be dropped ----------------------------
def test_a_webhook_in_retry_backoff_at_stop_is_dropped_out_loud(
    tmp_path: Path, hook: Hook
) -> None:
    """The receiver answers 503: the page waits out a long backoff before its retry.
    A stop ends the wait; the page that will now never be sent says so."""
    hook.behaviour = [503] * 10
    cfg = config(tmp_path, actions={"retry_backoff_seconds": 600,
                                    "webhook": {"url": hook.url()}})
    live = Live(cfg)
    append(cfg.metrics_file, nan_lines(1, 40, at=30))  # type: ignore[arg-type]
    live.wait_log("Action failed action=webhook step=30")
    live.stop()
    [dropped] = [ln for ln in live.log().splitlines() if "Action dropped" in ln]
    assert "action=webhook step=30 " in dropped and "reason=stopping" in dropped
    assert "in retry backoff after attempt 1" in dropped and len(hook.paths) == 1


# -- 65: thousands of snapshots ----------------------------------------------------------
def test_fault_65_housekeeping_learns_each_snapshot_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 published snapshots (copies: they share no file with the trainer): the
    disk budget walks each one's files once, and the check of linked snapshots reads
    each manifest once, however many reconciliations follow (20k of them, walked at
    every turn, cost 0.55 % of a core; ``benchmarks/latency.py --folders``)."""
    from smart_monitor.outputs import manifest, retention

    cfg = config(tmp_path, watch={"reconcile_seconds": 0.2})
    append(cfg.metrics_file, lines(1, 20))  # type: ignore[arg-type]
    n = 300
    for i in range(n):
        snap = cfg.snapshot_dir / f"anomaly_20260101_{i:06d}_loss_spike_200.0pct"
        (snap / "model").mkdir(parents=True)
        (snap / "model" / "model.safetensors").write_bytes(b"\0" * 256)
        (snap / "manifest.json").write_text(json.dumps({"version": 1, "files": {
            "model.safetensors": {"how": "copy", "size": 256, "mtime_ns": 0}}}))
        (snap / "metadata.json").write_text(json.dumps({
            "triggers": ["loss_spike_200.0pct"], "severity": "warning", "step": i,
            "created_at": f"2026-01-01T00:00:00.{i:03d}Z", "key": f"k{i}"}))
    walks: list[Path] = []
    loads: list[Path] = []
    sizes, load = retention._sizes, manifest.load
    monkeypatch.setattr(retention, "_sizes", lambda p: walks.append(p) or sizes(p))
    monkeypatch.setattr(manifest, "load", lambda p: loads.append(p) or load(p))
    live = Live(cfg)
    turns: list[int] = []
    retain = live.daemon._retain
    monkeypatch.setattr(live.daemon, "_retain", lambda: turns.append(1) or retain())
    wait_until(lambda: len(turns) >= 2, "two reconciliations")
    learnt = len(walks), len(loads)
    assert learnt == (n, n)
    wait_until(lambda: len(turns) >= 8, "six more")
    live.stop()
    assert (len(walks), len(loads)) == learnt, "housekeeping walked the snapshots again"
