"""What the monitor does beyond keeping a snapshot: write a stop file, signal the
trainer, run a command, POST to a webhook.

An action runs once per snapshot decision (a snapshot made, or one that failed) whose
trigger kind is listed in its ``on_triggers`` or whose severity reaches its
``on_severity``. Tying actions to snapshot decisions rather than to single detections
means the policy's cooldown that keeps one snapshot per incident also keeps one page per
incident, and a restarted daemon that re-reads lines it already snapshotted does not page
again. Actions run on one worker thread behind a bounded queue, each with a timeout, so a
slow webhook never delays the next record; a failure is logged and counted, never raised.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import threading
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from smart_monitor.config import (
    ActionConfig,
    ActionsConfig,
    CommandActionConfig,
    SignalActionConfig,
    WebhookActionConfig,
)
from smart_monitor.runtime.events import Event, SnapshotFailed, SnapshotMade
from smart_monitor.triggers import Severity

__all__ = ["ActionError", "Actions", "Incident", "Worker"]

_RANK = {"info": 0, "warning": 1, "critical": 2}
_OUTPUT_TAIL = 300  # characters of a failed command's output kept in the log line


class ActionError(Exception):
    """An action that ran and failed; the message goes into the ``Action failed`` line."""


@dataclass(frozen=True, slots=True)
class Incident:
    """A snapshot decision, flattened to plain values for every action."""

    event: str  # "snapshot" or "snapshot_failed"
    step: int
    severity: str
    triggers: tuple[str, ...]
    kinds: tuple[str, ...]
    snapshot: str | None
    reason: str | None

    @classmethod
    def from_event(cls, event: Event) -> Incident | None:
        if not isinstance(event, SnapshotMade | SnapshotFailed):
            return None
        request = event.request
        path = event.path if isinstance(event, SnapshotMade) else None
        return cls(
            event=event.name,
            step=int(request.step),
            severity=Severity(request.severity).value,
            triggers=tuple(t.name for t in request.triggers),
            kinds=tuple(t.kind for t in request.triggers),
            snapshot=None if path is None else str(path),
            reason=event.reason if isinstance(event, SnapshotFailed) else None,
        )

    def payload(self) -> dict[str, Any]:
        """Slack-compatible: Slack shows ``text``; other receivers read the fields."""
        where = (
            f"snapshot {self.snapshot}" if self.snapshot else f"snapshot failed: {self.reason}"
        )
        host = socket.gethostname()
        text = (
            f"smart_monitor {self.severity}: {','.join(self.triggers)} at step {self.step}"
            f" on {host} ({where})"
        )
        return {
            "text": text, "event": self.event, "step": self.step, "severity": self.severity,
            "triggers": list(self.triggers), "snapshot": self.snapshot, "reason": self.reason,
            "host": host,
        }

    def environ(self) -> dict[str, str]:
        return {
            "SMART_MONITOR_EVENT": self.event,
            "SMART_MONITOR_STEP": str(self.step),
            "SMART_MONITOR_SEVERITY": self.severity,
            "SMART_MONITOR_TRIGGERS": ",".join(self.triggers),
            "SMART_MONITOR_SNAPSHOT": self.snapshot or "",
            "SMART_MONITOR_REASON": self.reason or "",
        }


def matches(config: ActionConfig, incident: Incident) -> bool:
    """``on_triggers`` names kinds (``loss_nonfinite``) or full names (``loss_zscore_7.10``)."""
    wanted = set(config.on_triggers)
    if wanted & (set(incident.kinds) | set(incident.triggers)):
        return True
    floor = _RANK.get(config.on_severity)
    return floor is not None and _RANK[incident.severity] >= floor


# -- the four actions: each returns a short detail or raises --------------------------
def write_stop_file(path: Path, incident: Incident) -> str:
    """Atomically, so a trainer polling for the file never reads half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(incident.payload()) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ActionError(f"cannot write {path}: {exc.strerror or exc}") from None
    return str(path)


def send_signal(config: SignalActionConfig, incident: Incident) -> str:
    assert config.pidfile is not None
    try:
        text = config.pidfile.read_text(encoding="utf-8").split()
        pid = int(text[0]) if text else 0
    except (OSError, ValueError) as exc:
        raise ActionError(f"cannot read a PID from {config.pidfile}: {exc}") from None
    if pid <= 1:  # 0 and -1 would signal a whole process group or every process
        raise ActionError(f"refusing PID {pid} from {config.pidfile}")
    try:
        os.kill(pid, getattr(signal, config.signal))
    except OSError as exc:
        raise ActionError(f"kill {config.signal} {pid}: {exc.strerror or exc}") from None
    return f"{config.signal} {pid}"


def run_command(config: CommandActionConfig, incident: Incident, timeout: float) -> str:
    """An argument list, never a shell: trigger names cannot inject anything."""
    try:
        done = subprocess.run(
            config.argv, env={**os.environ, **incident.environ()}, stdin=subprocess.DEVNULL,
            capture_output=True, timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise ActionError(f"timed out after {timeout:g}s") from None
    except OSError as exc:
        raise ActionError(f"cannot run {config.argv[0]}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        out = (done.stderr or done.stdout).decode(errors="replace").strip()[-_OUTPUT_TAIL:]
        raise ActionError(f"exit status {done.returncode}: {out}")
    return f"exit status 0 ({config.argv[0]})"


def post_webhook(config: WebhookActionConfig, incident: Incident, timeout: float) -> str:
    body = json.dumps(incident.payload()).encode()  # the config allows http(s) URLs only
    request = urllib.request.Request(
        config.url, data=body, method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "smart-monitor"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return f"HTTP {response.status}"
    except OSError as exc:  # URLError, HTTPError, timeouts, refused connections
        raise ActionError(f"POST failed: {exc}") from None


# -- the worker -----------------------------------------------------------------------
class Worker:
    """One thread behind a bounded queue: the work the monitor does off its main loop
    (actions, plots). ``submit`` never blocks; a full queue drops the job and says so.
    A job that raises is logged by ``on_error``; the thread keeps going."""

    def __init__(
        self, name: str, size: int, on_error: Callable[[str, BaseException], None]
    ) -> None:
        self._queue: queue.Queue[tuple[str, Callable[[], object]] | None] = queue.Queue(size)
        self._on_error = on_error
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, label: str, job: Callable[[], object]) -> bool:
        try:
            self._queue.put_nowait((label, job))
        except queue.Full:
            return False
        return True

    def drop_queued(self) -> list[str]:
        """Take back the jobs not started yet; their labels, oldest first."""
        dropped: list[str] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return dropped
            if item is not None:
                dropped.append(item[0])

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            label, job = item
            try:
                job()
            except Exception as exc:  # a job's bug must not kill the thread
                self._on_error(label, exc)

    def stop(self, timeout: float) -> bool:
        """Finish what is queued (up to ``timeout``); True when the thread ended."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()


class Actions:
    """The engine listener that queues every configured action an incident matches."""

    def __init__(self, config: ActionsConfig, log: Any) -> None:
        self.config = config
        self.log = log
        timeout = config.timeout_seconds
        self.actions: list[tuple[str, ActionConfig, Callable[[Incident], str]]] = []
        if config.stop_file.path is not None:
            path = config.stop_file.path
            self.actions.append(("stop_file", config.stop_file, lambda i: write_stop_file(path, i)))
        if config.signal.pidfile is not None:
            self.actions.append(("signal", config.signal, lambda i: send_signal(config.signal, i)))
        if config.command.argv:
            self.actions.append(
                ("command", config.command, lambda i: run_command(config.command, i, timeout))
            )
        if config.webhook.url:
            self.actions.append(
                ("webhook", config.webhook, lambda i: post_webhook(config.webhook, i, timeout))
            )
        self.worker = (
            Worker("smart-monitor-actions", config.queue_size, self._crashed)
            if self.actions else None
        )

    def __call__(self, event: Event) -> None:
        incident = Incident.from_event(event)
        if incident is None or self.worker is None:
            return
        for name, cfg, run in self.actions:
            if not matches(cfg, incident):
                continue
            if not self.worker.submit(name, partial(self._run, name, run, incident)):
                self.log.error("Action dropped", action=name, step=incident.step,
                               triggers=list(incident.triggers), reason="queue_full")

    def _run(self, name: str, run: Callable[[Incident], str], incident: Incident) -> None:
        where = {"action": name, "step": incident.step, "triggers": list(incident.triggers),
                 "severity": incident.severity}
        try:
            detail = run(incident)
        except ActionError as exc:
            self.log.error("Action failed", **where, error=str(exc))
            return
        self.log.info("Action done", **where, detail=detail)

    def _crashed(self, label: str, exc: BaseException) -> None:
        self.log.error("Action failed", action=label, error=repr(exc))

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop(self.config.timeout_seconds + 1)
