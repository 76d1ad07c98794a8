"""What runs beside the pipeline, attached to an Engine as listeners: actions, the
Prometheus server and each snapshot's ``loss_history.png``.

``run`` attaches all of them (``attach_hooks``); ``replay`` attaches the plots alone
(``attach_plots``): replaying an old run must not page anyone or signal a trainer, but
its snapshots should look like live ones. Each attach returns the function that stops
what it started, draining queued work first.
"""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smart_monitor.config import Config, run_name
from smart_monitor.events import Event, SnapshotMade
from smart_monitor.hooks.actions import Actions, Worker
from smart_monitor.hooks.alertmanager import Alertmanager

if TYPE_CHECKING:
    from smart_monitor.runtime.engine import Engine

__all__ = ["attach_hooks", "attach_plots"]

_PLOT_QUEUE = 64
_PLOT_STOP_SECONDS = 0.5  # a stop waits this long, at most, for the plot being drawn (its
# child process finishes it anyway; `report` draws any missing): SIGTERM must stay under 5 s
_PLOT_CHILD_SECONDS = 600.0
_HOLD_POLL_SECONDS = 0.25  # how often a held plot asks whether it may start


def attach_plots(
    engine: Engine, log: Any, defer: bool = False, hold: Callable[[], bool] = lambda: False
) -> Callable[[], None]:
    """Draw ``loss_history.png`` into every new snapshot, in a child process started
    from a worker thread: the next record never waits for a drawing, and matplotlib
    (about 45 MB) never enters the daemon's memory. Off, with one warning, without
    matplotlib.

    ``defer`` (replay): draw them all, in one child, when stopped. A replay runs flat
    out, and work beside it would take CPU and the GIL from it. ``hold`` (run): while
    it says so (the daemon is reading a backlog) the next drawing waits, for the same
    reason; the snapshot itself is already made."""
    if importlib.util.find_spec("matplotlib") is None:
        log.warning("Plots off", reason="matplotlib missing: pip install 'smart-monitor[report]'")
        return lambda: None

    def failed(label: str, exc: BaseException) -> None:
        log.error("Plot failed", path=label, error=str(exc))

    worker = Worker("smart-monitor-plots", _PLOT_QUEUE, failed)
    deferred: list[Path] = []

    def on_event(event: Event) -> None:
        if not isinstance(event, SnapshotMade):
            return
        path = event.path
        if defer:
            deferred.append(path)
        elif not worker.submit(str(path), partial(_draw_when_free, path, hold)):
            log.warning("Plot skipped", path=str(path), reason="queue_full")

    engine.listeners.append(on_event)

    def stop() -> None:
        engine.listeners.remove(on_event)
        # a stop never waits for pictures: the ones not drawn yet are left to `report`
        dropped = worker.drop_queued()
        if dropped:
            log.warning("Plots not drawn", count=len(dropped), hint="smart-monitor report")
        worker.stop(_PLOT_STOP_SECONDS)
        if deferred:
            try:
                draw_in_child(deferred)
            except Exception as exc:  # the snapshots stand without their pictures
                failed(str(deferred[0].parent), exc)

    return stop


def _draw_when_free(snapshot: Path, hold: Callable[[], bool]) -> None:
    while hold():
        time.sleep(_HOLD_POLL_SECONDS)
    draw_in_child([snapshot])


def draw_in_child(snapshots: Sequence[Path]) -> None:
    """``python -m smart_monitor.tools.report SNAPSHOT...``; raises with its last error line.
    A snapshot removed meanwhile (by retention's ``max_count`` or ``max_bytes``) needs no
    plot."""
    snapshots = [s for s in snapshots if s.is_dir()]
    if not snapshots:
        return
    cmd = [sys.executable, "-m", "smart_monitor.tools.report", *map(str, snapshots)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=_PLOT_CHILD_SECONDS)
    if done.returncode != 0 and all(s.is_dir() for s in snapshots):
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        raise RuntimeError(lines[-1])


def attach_hooks(
    engine: Engine, config: Config, log: Any, hold_plots: Callable[[], bool] = lambda: False,
    status: Callable[[], str] = lambda: "",
) -> Callable[[], None]:
    """Actions, the metrics server and the plots for a live engine. A metrics port that
    cannot be bound is logged and skipped: watching the run matters more than serving
    numbers about it. ``status``: the daemon's health line (``degraded: ...``)."""
    stops: list[Callable[[], None]] = [attach_plots(engine, log, hold=hold_plots)]
    am = config.actions.alertmanager
    alertmanager = None
    if am.urls:
        identity = {"run": run_name(config), "host": socket.gethostname()}
        alertmanager = Alertmanager(am, identity, log, config.actions.timeout_seconds)
    actions = Actions(config.actions, log, alertmanager)
    if actions.actions:
        engine.listeners.append(actions)
        log.info("Actions on", actions=[name for name, _, _ in actions.actions])
    stops.append(actions.stop)
    if config.metrics.port:
        stops.append(_start_metrics(engine, config, log, status))

    def stop() -> None:
        for s in reversed(stops):
            s()
        if actions in engine.listeners:
            engine.listeners.remove(actions)

    return stop


def _start_metrics(
    engine: Engine, config: Config, log: Any, status: Callable[[], str]
) -> Callable[[], None]:
    if importlib.util.find_spec("prometheus_client") is None:
        log.error("Metrics off", reason="prometheus_client missing: pip install "
                  "'smart-monitor[metrics]'")
        return lambda: None
    from smart_monitor.hooks.metrics import MetricsServer

    server = MetricsServer(engine, config, status)
    try:
        port = server.start()
    except OSError as exc:
        log.error("Metrics off", address=config.metrics.address, port=config.metrics.port,
                  reason=exc.strerror or str(exc))
        return lambda: None
    engine.listeners.append(server)
    log.info("Serving metrics", address=config.metrics.address, port=port)

    def stop() -> None:
        engine.listeners.remove(server)
        server.stop()

    return stop
