"""Latency and footprint of the live daemon (``smart-monitor run``), as a process.

    .venv/bin/python benchmarks/latency.py            # about 2.5 minutes
    .venv/bin/python benchmarks/latency.py --quick    # a smoke run (about 30 s)
    .venv/bin/python benchmarks/latency.py --folders 20000   # idle beside 20k folders

1. Latency: the time from a line's append (a NaN loss, one critical anomaly, with a
   1 MiB checkpoint to pin) to its ``Created snapshot`` line in the log, for the
   inotify and the polling backend (``poll_interval = 1.0``, the default). Each anomaly
   follows 400 ordinary steps, so each is its own incident, past the cooldown.
2. Idle: CPU share of one core and RSS of the daemon over 30 s without a write, per
   backend (``/proc/<pid>/stat`` and ``status``).
3. Memory: RSS sampled while the daemon follows a 2-million-line metrics file written
   before it starts; flat means no history grows with the file.
4. ``--folders N``: idle CPU and RSS of a daemon beside N checkpoint folders and N
   published snapshots (each hard-linked to its checkpoint, as pins are), over a
   minute of reconciliations: housekeeping (retention, the disk budget, the check of
   linked snapshots, ``/metrics``) must not walk every file at each turn (FAULTS.md #65).

Goals (issue 3): p99 < 50 ms with inotify; p99 < poll_interval + 200 ms with polling;
idle < 0.5 % of a core; RSS < 60 MB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

SM = Path(sys.executable).with_name("smart-monitor")


def line(step: int, loss: float) -> str:
    return json.dumps({"step": step, "loss": loss, "learning_rate": 2e-4, "grad_norm": 1.0}) + "\n"


def flat_loss(step: int) -> float:
    return 1.0 + 0.01 * math.sin(step * 1.7)  # no trend: no best model, no alarm


def write_config(root: Path, backend: str, save: float = 5.0) -> Path:
    run, out = root / "run", root / "out"
    run.mkdir(parents=True, exist_ok=True)
    conf = root / f"{backend}.toml"
    conf.write_text(
        f'metrics_file = "{run}/metrics.jsonl"\ncheckpoint_dir = "{run}"\n'
        f'snapshot_dir = "{out}/snapshots"\nlog_dir = "{out}/logs"\nstate_dir = "{out}/state"\n'
        f'[watch]\nbackend = "{backend}"\n[state]\nsave_interval_seconds = {save}\n'
    )
    return conf


def start(conf: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(SM), "run", "--config", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def log_path(root: Path) -> Path:
    return next((root / "out" / "logs").glob("*.log"))


def started(root: Path) -> bool:
    logs = list((root / "out" / "logs").glob("*.log"))
    return bool(logs) and " Started " in logs[0].read_text()


def wait_for(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError("the daemon did not answer")
        time.sleep(0.01)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A ``/proc/<pid>/status`` size in MB: ``VmRSS`` (all resident pages), or
    ``RssAnon`` (the process's own memory; the rest is pages of mapped files, mostly
    shared libraries, whose count also follows what the page cache holds)."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith(f"{field}:"):
            return int(row.split()[1]) / 1024
    return math.nan


def cpu_seconds(pid: int) -> float:
    """On-CPU time of every thread, from the scheduler's own account (nanoseconds; the
    utime/stime ticks of /proc/<pid>/stat are sampled, too coarse for an idle process)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError):
            continue
    return total / 1e9


def latency(backend: str, samples: int) -> tuple[list[float], float, float, float]:
    """Milliseconds per anomaly, then the idle CPU %, RSS and anonymous RSS (MB) of the
    same daemon."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        conf = write_config(root, backend)
        ck = root / "run" / "checkpoint-1"
        ck.mkdir()
        (ck / "model.safetensors").write_bytes(os.urandom(1 << 20))
        (ck / "trainer_state.json").write_text('{"global_step": 1}')
        metrics = root / "run" / "metrics.jsonl"
        proc = start(conf)
        try:
            wait_for(lambda: started(root))
            log = log_path(root)
            fd = os.open(metrics, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            out: list[float] = []
            step = 1
            for _ in range(samples):
                quiet = "".join(line(s, flat_loss(s)) for s in range(step + 1, step + 400))
                os.write(fd, quiet.encode())
                step += 400
                time.sleep(0.3 if backend == "inotify" else 1.2)  # let it catch up
                size = log.stat().st_size
                t0 = time.perf_counter()
                os.write(fd, line(step, math.nan).encode())
                while True:
                    with open(log, "rb") as fh:
                        fh.seek(size)
                        if b"Created snapshot" in fh.read():
                            break
                    time.sleep(0.0005)
                out.append((time.perf_counter() - t0) * 1000)
            os.close(fd)
            time.sleep(10)  # the plot hook draws each snapshot's PNG after it is made
            idle = 30.0 if samples > 5 else 5.0
            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(idle)
            cpu = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0) * 100
            rss = rss_mb(proc.pid)
            anon = rss_mb(proc.pid, "RssAnon")
        finally:
            stop(proc)
        return out, cpu, rss, anon


def big_file(lines: int) -> tuple[list[tuple[int, float]], float]:
    """RSS samples (percent of the file done, MB) while following it, and lines/s."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        conf = write_config(root, "inotify", save=0.5)
        metrics = root / "run" / "metrics.jsonl"
        with open(metrics, "w") as fh:
            for start_at in range(1, lines + 1, 100_000):
                end = min(lines, start_at + 99_999)
                fh.write("".join(line(s, flat_loss(s)) for s in range(start_at, end + 1)))
        size = metrics.stat().st_size
        state = root / "out" / "state" / "state.json"

        def offset() -> int:
            try:
                return int(json.loads(state.read_text())["data"]["tailer"]["offset"])
            except (OSError, ValueError, KeyError):
                return 0

        proc = start(conf)
        t0 = time.monotonic()
        samples: list[tuple[int, float]] = []
        try:
            while (done := offset()) < size:
                samples.append((done * 100 // size, rss_mb(proc.pid)))
                time.sleep(1.0)
            elapsed = time.monotonic() - t0
            samples.append((100, rss_mb(proc.pid)))
        finally:
            stop(proc)
        return samples, lines / elapsed


def crowded(folders: int, idle: float) -> tuple[float, float, float]:
    """Seconds to start, idle CPU % and RSS (MB) beside ``folders`` checkpoint folders
    and as many published snapshots."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        conf = write_config(root, "inotify")
        with open(conf, "a") as fh:
            fh.write('[metrics]\nport = 0\n')
        run, snaps = root / "run", root / "out" / "snapshots"
        snaps.mkdir(parents=True)
        (run / "metrics.jsonl").write_text("".join(line(s, flat_loss(s)) for s in range(1, 51)))
        for i in range(1, folders + 1):
            ck = run / f"checkpoint-{i * 10}"
            ck.mkdir()
            (ck / "model.safetensors").write_bytes(b"\0" * 256)
            (ck / "trainer_state.json").write_text(json.dumps({"global_step": i * 10}))
            snap = snaps / f"anomaly_20260101_{i:06d}_loss_spike_200.0pct"
            (snap / "model").mkdir(parents=True)
            os.link(ck / "model.safetensors", snap / "model" / "model.safetensors")
            st = (snap / "model" / "model.safetensors").stat()
            (snap / "manifest.json").write_text(json.dumps({"version": 1, "files": {
                "model.safetensors": {"how": "hardlink", "size": 256,
                                      "mtime_ns": st.st_mtime_ns}}}))
            (snap / "metadata.json").write_text(json.dumps({
                "triggers": ["loss_spike_200.0pct"], "severity": "warning", "step": i * 10,
                "created_at": f"2026-01-01T00:00:{i % 60:02d}.000Z", "key": f"k{i}"}))
        t0 = time.monotonic()
        proc = start(conf)
        try:
            wait_for(lambda: started(root), timeout=600)
            ready = time.monotonic() - t0
            time.sleep(15)  # the first reconciliations: sizes learnt once
            c0, t1 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(idle)
            cpu = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t1) * 100
            rss = rss_mb(proc.pid)
        finally:
            stop(proc)
        return ready, cpu, rss


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(q * len(s)) - 1)]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="few samples, 5 s idle, 200k lines")
    p.add_argument("--folders", type=int, default=0,
                   help="only: idle CPU and RSS beside this many checkpoints and snapshots")
    a = p.parse_args()
    if a.folders:
        ready, cpu, rss = crowded(a.folders, 10.0 if a.quick else 60.0)
        print(f"{a.folders:,} checkpoint and {a.folders:,} snapshot folders: started in "
              f"{ready:.1f} s; idle CPU {cpu:.2f} % of a core, RSS {rss:.1f} MB")
        return
    n_inotify, n_polling, n_lines = (5, 3, 200_000) if a.quick else (40, 12, 2_000_000)
    print(f"host: {os.cpu_count()} CPUs, python {sys.version.split()[0]}")
    for backend, n in (("inotify", n_inotify), ("polling", n_polling)):
        ms, cpu, rss, anon = latency(backend, n)
        print(f"{backend:8} append -> 'Created snapshot': median {statistics.median(ms):7.1f} ms,"
              f" p99 {pct(ms, 0.99):7.1f} ms, max {max(ms):7.1f} ms (n={len(ms)});"
              f" idle CPU {cpu:.2f} % of a core, RSS {rss:.1f} MB ({anon:.1f} MB anonymous)")
    samples, rate = big_file(n_lines)
    rss = [r for d, r in samples if d > 0]  # 0 %: the process is still starting
    shown = samples[:: max(1, len(samples) // 8)] + samples[-1:]
    print(f"{n_lines:,} lines followed at {rate:,.0f} lines/s; RSS MB at % done: "
          + ", ".join(f"{d}%={r:.1f}" for d, r in shown))
    print(f"RSS min {min(rss):.1f} MB, max {max(rss):.1f} MB, final {rss[-1]:.1f} MB")


if __name__ == "__main__":
    main()
