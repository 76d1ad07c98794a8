"""FAULTS.md cases 34, 35, 36 and 49, each against the real command: configs that
validate must run, folders are checked at start, one instance per folder, and hard
links from the trainer's files are tried before the first snapshot needs them.

Cases with a second user run the real ``smart-monitor`` under ``setpriv`` as
``nobody`` (the tests run as root, for whom every permission check passes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from live_harness import (
    SMART_MONITOR,
    append,
    config,
    lines,
    spawn,
    terminate,
    tmpfs_mount,
    wait_until,
    write_checkpoint,
    write_config_file,
)

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def cli(*args: str | Path, user: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(user or []), str(SMART_MONITOR), *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False,
    )


def one_line_exit_2(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    err = result.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# -- 49: configs that validate but could not run ----------------------------------------
@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[watch]\nreconcile_seconds = 1e300\n", "watch.reconcile_seconds"),
        ('[checkpoints]\npattern = "{step}-{step}"\n', "checkpoints.pattern"),
        ('log_dir = "A_FILE"\n', "log_dir"),
        ('snapshot_dir = "/proc/smart-monitor-snapshots"\n', "snapshot_dir"),
        ('state_dir = "A_FILE/state"\n', "state_dir"),
        ('snapshot_dir = ""\n', "snapshot_dir"),
        ("[detectors.loss_zscore]\nwarmup = 60\n", "detectors.loss_zscore"),
        ("[detectors.lr_zscore]\ncritical = 3.0\n", "detectors.lr_zscore"),
        ('[actions.webhook]\non_triggers = ["loss_nan"]\n', "actions.webhook.on_triggers"),
        ('[actions.signal]\nsignal = "SIG_IGN"\n', "actions.signal"),
    ],
)
def test_fault_49_check_config_and_run_agree_exit_2_naming_the_key(
    tmp_path: Path, toml: str, key: str
) -> None:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    metrics = tmp_path / "run" / "metrics.jsonl"
    append(metrics, lines(1, 5))
    out = tmp_path / "out"
    paths = (
        f'metrics_file = "{metrics}"\ncheckpoint_dir = "{metrics.parent}"\n'
        + "".join(
            f'{k} = "{out / k}"\n'
            for k in ("snapshot_dir", "log_dir", "state_dir")
            if f"{k} =" not in toml
        )
    )
    cfg = tmp_path / "bad.toml"
    cfg.write_text(paths + toml.replace("A_FILE", str(a_file)))
    for args in (("check-config", cfg), ("run", "--config", cfg)):
        one_line_exit_2(cli(*args), key)
    assert not (tmp_path / "snapshots").exists() and not Path("snapshots").exists()


def test_fault_49_a_config_path_that_is_a_folder_or_not_utf8(tmp_path: Path) -> None:
    folder = tmp_path / "conf.toml"
    folder.mkdir()
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'log_dir = "caf\xe9"\n')
    for path, why in ((folder, "Is a directory"), (latin, "not UTF-8")):
        for args in (("check-config", path), ("run", "--config", path)):
            one_line_exit_2(cli(*args), str(path), why)


def test_fault_49_the_documented_defaults_still_pass(tmp_path: Path) -> None:
    cfg = write_config_file(config(tmp_path), tmp_path / "ok.toml")
    result = cli("check-config", cfg)
    assert result.returncode == 0, result.stderr
    assert not list((tmp_path / "out").glob("*/.tmp-probe-*")), "a probe was left behind"


# -- 36: one instance per state or snapshot folder ---------------------------------------
def test_fault_36_second_instance_exits_2_naming_the_holder(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    append(cfg.metrics_file, lines(1, 30))  # type: ignore[arg-type]
    first_file = write_config_file(cfg, tmp_path / "first.toml")
    first = spawn(first_file, tmp_path / "first.err")
    try:
        log_dir = cfg.log_dir
        wait_until(
            lambda: any(" Started " in p.read_text() for p in log_dir.glob("*.log")),
            "the first instance's Started", 60,
        )
        busy = cfg.snapshot_dir / ".tmp-0123456789ab"  # a snapshot the first one is making
        busy.mkdir()
        pid = str(first.pid)
        one_line_exit_2(cli("run", "--config", first_file), "state_dir", f"pid {pid}")
        # another state folder, the same snapshot folder
        other = cfg.model_copy(update={"state_dir": tmp_path / "other-state",
                                       "log_dir": tmp_path / "other-logs"})
        other_file = write_config_file(other, tmp_path / "other.toml")
        one_line_exit_2(cli("run", "--config", other_file), "snapshot_dir", f"pid {pid}")
        one_line_exit_2(
            cli("replay", "--metrics", tmp_path / "run" / "metrics.jsonl",
                "--checkpoints", tmp_path / "run", "--output", tmp_path / "out"),
            "snapshot_dir", f"pid {pid}",
        )
        assert busy.is_dir(), "a second instance removed a snapshot in progress"
        assert not (tmp_path / "other-state" / "state.json").exists()
        assert first.poll() is None, "the first instance died"
    finally:
        assert terminate(first) == 0
    # the lock dies with its holder: the next start takes it at once
    second = spawn(first_file, tmp_path / "second.err")
    try:
        wait_until(lambda: cfg.log_dir.is_dir() and sum(
            p.read_text().count(" Started ") for p in cfg.log_dir.glob("*.log")) >= 2,
            "the second start", 60)
        assert not busy.exists(), "the holder of the lock cleans .tmp-* at start"
    finally:
        assert terminate(second) == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs_mount(tmp_path / "tmpfs", "16m") as mounted:
        yield mounted


# -- 34, 35: as another user ---------------------------------------------------------
@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A folder ``nobody`` can reach (pytest's tmp_path is root's, mode 0700)."""
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed for the second user"
    assert os.geteuid() == 0, "switching to a second user needs root"
    root = Path(tempfile.mkdtemp(prefix="smart-monitor-faults-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _nobody_setup(root: Path, trainer_mode: int = 0o644) -> Path:
    """The trainer's run (root's files) and an output folder that nobody owns."""
    run = root / "run"
    append(run / "metrics.jsonl", lines(1, 20))
    write_checkpoint(run, 10)
    for p in [run, *run.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else trainer_mode)
    out = root / "out"
    out.mkdir()
    os.chown(out, 65534, 65534)
    return run


def _nobody_run(root: Path, **overrides: Path) -> subprocess.CompletedProcess[str]:
    run, out = root / "run", root / "out"
    paths = {"snapshot_dir": out / "snapshots", "log_dir": out / "logs",
             "state_dir": out / "state", **overrides}
    toml = root / "nobody.toml"
    toml.write_text(
        f'metrics_file = "{run / "metrics.jsonl"}"\ncheckpoint_dir = "{run}"\n'
        + "".join(f'{k} = "{v}"\n' for k, v in paths.items())
    )
    toml.chmod(0o644)
    # a run that starts is stopped by the timeout below: only start-up failures matter
    return subprocess.run(
        ["timeout", "-s", "TERM", "20", *NOBODY, str(SMART_MONITOR), "run", "--config", str(toml)],
        capture_output=True, text=True, timeout=120, check=False,
    )


@pytest.mark.parametrize("which", ["snapshot_dir", "state_dir", "log_dir"])
def test_fault_34_unwritable_folder_at_start_exits_2_naming_it(
    shared_root: Path, which: str
) -> None:
    _nobody_setup(shared_root)
    locked = shared_root / "roots-only"
    locked.mkdir(mode=0o755)  # root's: nobody may not write here
    err = one_line_exit_2(_nobody_run(shared_root, **{which: locked / "x"}), which)
    assert "not writable" in err and str(locked) in err


def test_fault_34_unlistable_checkpoint_folder_exits_2(shared_root: Path) -> None:
    run = _nobody_setup(shared_root)
    run.chmod(0o711)  # nobody may open files it names, not list them
    err = one_line_exit_2(_nobody_run(shared_root), "checkpoint_dir", "cannot be listed")
    assert str(run) in err


def test_fault_35_protected_hardlinks_found_at_start(shared_root: Path) -> None:
    assert Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1"
    _nobody_setup(shared_root, trainer_mode=0o644)  # readable, not writable by nobody
    err = one_line_exit_2(_nobody_run(shared_root), "fs.protected_hardlinks",
                          "trainer's user or group", 'snapshot.mode = "copy"')
    assert "uid 65534" in err
    assert not list((shared_root / "out").rglob(".tmp-linkprobe-*"))


def test_fault_35_trainers_group_keeps_hard_links(shared_root: Path) -> None:
    """The deployment docs/reliability.md describes: the monitor in the trainer's
    group, checkpoints group-writable (umask 002): the trial link works, it starts."""
    run = _nobody_setup(shared_root, trainer_mode=0o664)
    for p in [run, *run.rglob("*")]:
        os.chown(p, 0, 65534)
    result = _nobody_run(shared_root)
    assert result.returncode == 124, result.stderr  # ran until timeout's SIGTERM
    assert " Started " in result.stderr and " Stopped " in result.stderr


def test_fault_35_other_file_system_found_at_start(tmp_path: Path, tmpfs: Path) -> None:
    cfg = config(tmp_path, snapshot_dir=tmpfs / "snapshots")
    append(cfg.metrics_file, lines(1, 5))  # type: ignore[arg-type]
    err = one_line_exit_2(cli("run", "--config", write_config_file(cfg, tmp_path / "c.toml")),
                          "different file systems", "snapshot_dir")
    assert str(tmpfs / "snapshots") in err
    copy = cfg.model_copy(update={"snapshot": cfg.snapshot.model_copy(update={"mode": "copy"})})
    proc = spawn(write_config_file(copy, tmp_path / "copy.toml"), tmp_path / "copy.err")
    try:
        wait_until(lambda: cfg.log_dir.is_dir() and any(
            " Started " in p.read_text() for p in cfg.log_dir.glob("*.log")), "Started", 60)
    finally:
        assert terminate(proc) == 0
