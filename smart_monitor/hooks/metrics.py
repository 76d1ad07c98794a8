"""Prometheus ``/metrics`` for one monitor: what it read, what it found, what it kept.

A private registry per engine, so two monitors in one process (tests, a notebook) never
share counters. Counts the engine already keeps (records, malformed lines, last step) are
read at scrape time rather than mirrored on every record, which keeps the hot path free
of locks; events the engine emits (detections, snapshots) feed labelled counters.

Every series carries ``run`` and ``host``, so one Prometheus tells many monitors apart
(``deploy/prometheus/smart_monitor_rules.yml`` alerts on them). An open incident is a
gauge, present while it lasts: an alert on it fires when the incident opens and ends
when it recovers, which a counter that first appears at its final value (a monitor
catching up on a backlog between two scrapes) could not give.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterator, Mapping
from threading import Thread
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from smart_monitor.config import Config, run_name
from smart_monitor.events import (
    Detected,
    Event,
    IncidentSettled,
    Restarted,
    SnapshotFailed,
    SnapshotMade,
)
from smart_monitor.outputs.retention import disk_budget
from smart_monitor.triggers import kind_of

if TYPE_CHECKING:
    from smart_monitor.runtime.engine import Engine

__all__ = ["MetricsServer"]

IDENTITY = ("run", "host")
_SERIES = (  # the newest value of each main series, as the pipeline keeps it
    ("loss", "smart_monitor_train_loss", "Newest train loss (NaN when it was NaN)."),
    ("eval_loss", "smart_monitor_eval_loss", "Newest eval loss."),
    ("learning_rate", "smart_monitor_learning_rate", "Newest learning rate."),
    ("grad_norm", "smart_monitor_grad_norm", "Newest gradient norm."),
)


class _EngineCollector(Collector):
    """Reads the engine's own counters and state when Prometheus scrapes."""

    def __init__(
        self, engine: Engine, started_at: float, identity: tuple[str, str],
        status: Callable[[], str],
        settled: Mapping[str, tuple[str, str, str, int]],
    ) -> None:
        self.engine = engine
        self.settled = settled
        self.started_at = started_at
        self.identity = list(identity)
        self.status = status

    def _one(
        self, family: type[CounterMetricFamily | GaugeMetricFamily], name: str, text: str,
        value: float,
    ) -> Metric:
        metric = family(name, text, labels=IDENTITY)
        metric.add_metric(self.identity, value)
        return metric

    def collect(self) -> Iterator[Metric]:
        counts, pipeline = self.engine.counts, self.engine.pipeline
        yield self._one(CounterMetricFamily, "smart_monitor_records", "Records processed.",
                        counts.get("records", 0))
        yield self._one(CounterMetricFamily, "smart_monitor_malformed_lines",
                        "Lines skipped as malformed or oversized.", counts.get("malformed", 0))
        last_step = pipeline.last_step
        yield self._one(GaugeMetricFamily, "smart_monitor_last_step",
                        "Step of the newest record (NaN before the first).",
                        math.nan if last_step is None else last_step)
        last = self.engine.ingest.last_record_at
        since = self.engine.clock() - (self.started_at if last is None else last)
        yield self._one(
            GaugeMetricFamily, "smart_monitor_seconds_since_last_record",
            "Seconds since the last record (since start before the first): a stalled trainer.",
            max(since, 0.0),
        )
        latest = dict(pipeline.latest)  # a copy: the main thread updates it
        for key, name, text in _SERIES:
            if key in latest:
                yield self._one(GaugeMetricFamily, name, text, latest[key])
        yield from self._incidents()
        yield self._one(GaugeMetricFamily, "smart_monitor_degraded",
                        "1 while the monitor runs degraded (its log, state or watcher).",
                        1.0 if self.status().startswith("degraded") else 0.0)
        mode, why = self.engine.writer.mode_in_use
        info = GaugeMetricFamily(
            "smart_monitor_snapshot_mode_info",
            "How snapshots hold the checkpoint's files (reflink, hardlink, copy) and why.",
            labels=[*IDENTITY, "mode", "why"],
        )
        info.add_metric([*self.identity, mode, why], 1)
        yield info
        series = GaugeMetricFamily(
            "smart_monitor_series_value",
            "Last value of every series the run logs, by its name and role (series.py).",
            labels=[*IDENTITY, "series", "role"],
        )
        for name, role, value in self.engine.series.values():
            series.add_metric([*self.identity, name, role], value)
        yield series
        # the daemon's housekeeping keeps it (its free space refreshed at each
        # reconciliation): a scrape never walks every snapshot (FAULTS.md #65)
        budget = self.engine.writer.budget
        if budget is None:  # before the first reconciliation, or an engine without a daemon
            budget = disk_budget(self.engine.writer, self.engine.config.snapshot)
        for name, text, value in (
            ("held", "Bytes the snapshots add to their file system.", budget.held),
            ("budget", "Bytes the snapshots may hold (0: no share limit).", budget.budget),
            ("free", "Free bytes on the snapshots' file system.", budget.free),
            ("floor", "Free bytes the snapshots never push it below (0: off).", budget.floor),
        ):
            yield self._one(GaugeMetricFamily, f"smart_monitor_snapshot_{name}_bytes", text,
                            value)

    def _incidents(self) -> Iterator[Metric]:
        """One series per open incident, its value the step it started at (and per
        settled one: the loss stayed worse, so its alert must not resolve); ``trigger``:
        the kind that opened it (it stays while the incident lasts, so an alert on it
        does not restart when a second kind joins); ``severity``: its peak so far."""
        family = GaugeMetricFamily(
            "smart_monitor_incident_started_step",
            "Open incidents: the step each started at, by problem, first trigger kind and"
            " peak severity.",
            labels=[*IDENTITY, "problem", "trigger", "severity"],
        )
        for incident in list(self.engine.pipeline.policy.open.values()):
            first = incident.kinds[0] if incident.kinds else kind_of(incident.peak_trigger)
            family.add_metric([*self.identity, incident.problem, first, incident.severity],
                              incident.started)
        for problem, first, severity, started in list(self.settled.values()):
            family.add_metric([*self.identity, problem, first, severity], started)
        yield family


class MetricsServer:
    """The engine listener that counts events, and the HTTP server that shows them."""

    def __init__(
        self, engine: Engine, config: Config, status: Callable[[], str] = lambda: "",
    ) -> None:
        self.config = config.metrics
        self.identity = (run_name(config), socket.gethostname())
        # incidents that ended with the loss at a worse level: id -> their gauge's labels
        self.settled: dict[str, tuple[str, str, str, int]] = {}
        self.registry = CollectorRegistry()
        labels = [*IDENTITY, "trigger", "severity"]
        self.detections = Counter(
            "smart_monitor_detections", "Detections by trigger kind and severity.",
            labels, registry=self.registry,
        )
        self.snapshots = Counter(
            "smart_monitor_snapshots",
            "Snapshots by trigger kind and severity (one per trigger of a MULTIPLE_TRIGGERS one).",
            labels, registry=self.registry,
        )
        self.failures = Counter(
            "smart_monitor_snapshot_failures", "Snapshots that failed, by reason.",
            [*IDENTITY, "reason"], registry=self.registry,
        )
        self.snapshot_bytes = Counter(
            "smart_monitor_snapshot_bytes", "Bytes of checkpoint files kept in snapshots.",
            IDENTITY, registry=self.registry,
        ).labels(*self.identity)
        self.restarts = Counter(
            "smart_monitor_trainer_restarts", "Times the steps went backwards (a resume).",
            IDENTITY, registry=self.registry,
        ).labels(*self.identity)
        self.registry.register(
            _EngineCollector(engine, engine.clock(), self.identity, status, self.settled)
        )
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def __call__(self, event: Event) -> None:
        run, host = self.identity
        if isinstance(event, Detected):
            self.detections.labels(run, host, event.kind, event.severity).inc()
        elif isinstance(event, SnapshotMade):
            request = event.request
            for t in request.triggers:
                self.snapshots.labels(run, host, t.kind, request.severity.value).inc()
            self.snapshot_bytes.inc(event.bytes)
        elif isinstance(event, SnapshotFailed):
            self.failures.labels(run, host, event.reason).inc()
        elif isinstance(event, Restarted):
            self.restarts.inc()
        elif isinstance(event, IncidentSettled):
            self.settled[event.incident] = (
                event.problem, event.trigger, event.severity, event.started
            )

    def start(self) -> int:
        """Serve ``/metrics``; returns the port. Raises OSError when it cannot bind."""
        self._server, self._thread = start_http_server(
            self.config.port, addr=self.config.address, registry=self.registry
        )
        return int(self._server.server_port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None
