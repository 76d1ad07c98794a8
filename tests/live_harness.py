"""The live daemon in this process (a thread) or as a subprocess, a trainer's metrics
lines, and waiting on what the daemon logs: shared by test_faults and test_daemon."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from smart_monitor.config import Config, load_config
from smart_monitor.hooks.attach import attach_hooks
from smart_monitor.outputs.log import make_logger
from smart_monitor.runtime.daemon import Daemon
from smart_monitor.runtime.notify import Notifier
from smart_monitor.sources.watch import ObserverFactory, make_observer

SMART_MONITOR = Path(sys.executable).with_name("smart-monitor")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # the simulators and the demo
BACKENDS = ["inotify", "polling"]


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait on a condition, not a clock: on a loaded machine a start-up alone takes
    seconds (8 s measured at load 9 on 2 cores), and a passing test never waits long."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def loss_at(step: int) -> float:
    """A smooth, slightly noisy loss curve (deterministic)."""
    return 2.0 * (step + 50) ** -0.3 * (1 + 0.01 * math.sin(step * 1.7))


def line(step: int, loss: float | None = None, **extra: Any) -> bytes:
    rec = {"step": step, "loss": loss_at(step) if loss is None else loss,
           "learning_rate": 2e-4, "grad_norm": 1.0, **extra}
    return (json.dumps(rec) + "\n").encode()


def lines(first: int, last: int, spikes: tuple[int, ...] = ()) -> bytes:
    return b"".join(line(s, loss_at(s) * (4 if s in spikes else 1)) for s in range(first, last + 1))


def append(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        fh.write(data)


def write_checkpoint(root: Path, step: int, marker: bool = True, size: int = 4096) -> Path:
    ck = root / f"checkpoint-{step}"
    ck.mkdir(parents=True, exist_ok=True)
    (ck / "model.safetensors").write_bytes((step.to_bytes(4, "little") * size)[:size])
    if marker:
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ck


def snapshots(out: Path, running: bool = False) -> list[dict[str, Any]]:
    """The published snapshots. A ``.tmp-*`` folder fails the test, unless the daemon
    is ``running``: then it is a snapshot being made, not one left behind."""
    snaps = out / "snapshots"
    if not snaps.is_dir():
        return []
    found = []
    for p in sorted(snaps.iterdir()):
        if running and p.name.startswith(".tmp-"):
            continue
        assert not p.name.startswith(".tmp-"), f"temporary left: {p.name}"
        meta = json.loads((p / "metadata.json").read_text())
        meta["_path"] = p
        found.append(meta)
    return found


def log_text(out: Path) -> str:
    logs = out / "logs"
    return "".join(p.read_text() for p in sorted(logs.glob("*.log"))) if logs.is_dir() else ""


def config(tmp_path: Path, backend: str = "inotify", **overrides: Any) -> Config:
    """Metrics in ``run/metrics.jsonl``, checkpoints in ``run/``, output in ``out/``;
    quick polls, and a reconciliation slow enough that events must do the work."""
    out = tmp_path / "out"
    data: dict[str, Any] = {
        "metrics_file": tmp_path / "run" / "metrics.jsonl",
        "checkpoint_dir": tmp_path / "run",
        "snapshot_dir": out / "snapshots",
        "log_dir": out / "logs",
        "state_dir": out / "state",
        "watch": {"backend": backend, "poll_interval": 0.05, "reconcile_seconds": 60},
        "checkpoints": {"settle_seconds": 60},
        "snapshot": {"checkpoint_wait_seconds": 1.0},
        "state": {"save_interval_seconds": 0.2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return Config.model_validate(data)


class Live:
    """A Daemon running in a thread, stopped as SIGTERM would (``stop``)."""

    def __init__(
        self,
        cfg: Config,
        notify_env: dict[str, str] | None = None,
        factory: ObserverFactory = make_observer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = cfg
        self.out = cfg.log_dir.parent
        log, daily = make_logger(cfg.log_dir, stderr=None)
        self.daemon = Daemon(
            cfg, log, daily, Notifier(notify_env or {}), clock=clock, observer_factory=factory,
            hooks=lambda engine, hold, status: attach_hooks(engine, cfg, log, hold, status),
        )
        self.error: BaseException | None = None
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        wait_until(lambda: " Started " in self.log() or self.error is not None, "Started")

    def _run(self) -> None:
        try:
            self.code = self.daemon.run()
        except BaseException as exc:
            self.error = exc

    def log(self) -> str:
        return log_text(self.out)

    @property
    def records(self) -> int:
        return self.daemon.engine.counts["records"]

    def wait_records(self, n: int, timeout: float = 60.0) -> None:
        wait_until(lambda: self.records >= n, f"{n} records (have {self.records})", timeout)
        assert self.records == n

    def wait_log(self, text: str, count: int = 1, timeout: float = 60.0) -> None:
        wait_until(lambda: self.log().count(text) >= count, f"{count}x {text!r}", timeout)

    def stop(self) -> None:
        self.daemon.stop()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the daemon did not stop"
        assert self.error is None, repr(self.error)
        assert self.code == 0


def write_config_file(cfg: Config, path: Path) -> Path:
    """The same settings as a TOML file, for ``smart-monitor run --config``."""

    def value(v: Any) -> str:
        return json.dumps(str(v)) if isinstance(v, Path) else json.dumps(v)

    def table(name: str, data: dict[str, Any]) -> list[str]:
        out = [f"[{name}]"] if name else []
        out += [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
        for k, v in data.items():
            if isinstance(v, dict):
                out += table(f"{name}.{k}" if name else k, v)
        return out

    data = cfg.model_dump(mode="python", exclude_defaults=True)
    path.write_text("\n".join(table("", data)) + "\n")
    assert load_config(path) == cfg
    return path


def spawn(config_file: Path, stderr: Path, **popen: Any) -> subprocess.Popen[bytes]:
    with open(stderr, "ab") as err:
        return subprocess.Popen(
            [str(SMART_MONITOR), "run", "--config", str(config_file)],
            stdout=subprocess.DEVNULL, stderr=err, **popen,
        )


def terminate(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def kill9(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def tmpfs_mount(where: Path, size: str = "64m") -> Iterator[Path]:
    """A real, small file system (root only): its ENOSPC is the real one, and it is
    another device than the test's folder (EXDEV for hard links)."""
    assert os.geteuid() == 0, "mounting a tmpfs needs root (make test runs as root)"
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
