"""Prometheus ``/metrics`` for one monitor: what it read, what it found, what it kept.

A private registry per engine, so two monitors in one process (tests, a notebook) never
share counters. Counts the engine already keeps (records, malformed lines, last step) are
read at scrape time rather than mirrored on every record, which keeps the hot path free
of locks; events the engine emits (detections, snapshots) feed labelled counters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from threading import Thread
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from smart_monitor.config import MetricsConfig
from smart_monitor.outputs.retention import disk_budget
from smart_monitor.runtime.events import Detected, Event, Restarted, SnapshotFailed, SnapshotMade

if TYPE_CHECKING:
    from smart_monitor.runtime.engine import Engine

__all__ = ["MetricsServer"]


class _EngineCollector(Collector):
    """Reads the engine's own counters when Prometheus scrapes."""

    def __init__(self, engine: Engine, started_at: float) -> None:
        self.engine = engine
        self.started_at = started_at

    def collect(self) -> Iterator[Metric]:
        counts = self.engine.counts
        yield CounterMetricFamily(
            "smart_monitor_records", "Records processed.", value=counts.get("records", 0)
        )
        yield CounterMetricFamily(
            "smart_monitor_malformed_lines",
            "Lines skipped as malformed or oversized.",
            value=counts.get("malformed", 0),
        )
        last_step = self.engine.pipeline.last_step
        yield GaugeMetricFamily(
            "smart_monitor_last_step",
            "Step of the newest record (NaN before the first).",
            value=math.nan if last_step is None else last_step,
        )
        last = self.engine.ingest.last_record_at
        since = self.engine.clock() - (self.started_at if last is None else last)
        yield GaugeMetricFamily(
            "smart_monitor_seconds_since_last_record",
            "Seconds since the last record (since start before the first): a stalled trainer.",
            value=max(since, 0.0),
        )
        series = GaugeMetricFamily(
            "smart_monitor_series_value",
            "Last value of every series the run logs, by its name and role (series.py).",
            labels=["series", "role"],
        )
        for name, role, value in self.engine.series.values():
            series.add_metric([name, role], value)
        yield series
        budget = disk_budget(self.engine.writer, self.engine.config.snapshot)
        for name, text, value in (
            ("held", "Bytes the snapshots add to their file system.", budget.held),
            ("budget", "Bytes the snapshots may hold (0: no share limit).", budget.budget),
            ("free", "Free bytes on the snapshots' file system.", budget.free),
            ("floor", "Free bytes the snapshots never push it below (0: off).", budget.floor),
        ):
            yield GaugeMetricFamily(f"smart_monitor_snapshot_{name}_bytes", text, value=value)


class MetricsServer:
    """The engine listener that counts events, and the HTTP server that shows them."""

    def __init__(self, engine: Engine, config: MetricsConfig) -> None:
        self.config = config
        self.registry = CollectorRegistry()
        labels = ["trigger", "severity"]
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
            ["reason"], registry=self.registry,
        )
        self.snapshot_bytes = Counter(
            "smart_monitor_snapshot_bytes", "Bytes of checkpoint files kept in snapshots.",
            registry=self.registry,
        )
        self.restarts = Counter(
            "smart_monitor_trainer_restarts", "Times the steps went backwards (a resume).",
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine, engine.clock()))
        self._server: WSGIServer | None = None
        self._thread: Thread | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, Detected):
            self.detections.labels(event.kind, event.severity).inc()
        elif isinstance(event, SnapshotMade):
            request = event.request
            for t in request.triggers:
                self.snapshots.labels(t.kind, request.severity.value).inc()
            self.snapshot_bytes.inc(event.bytes)
        elif isinstance(event, SnapshotFailed):
            self.failures.labels(event.reason).inc()
        elif isinstance(event, Restarted):
            self.restarts.inc()

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
