"""What the monitor does beyond keeping a snapshot: write a stop file, signal the
trainer, run a command, POST to a webhook.

An action runs once per snapshot decision (a snapshot made, or one that failed) whose
trigger kind is listed in its ``on_triggers`` or whose severity reaches its
``on_severity``. Tying actions to snapshot decisions rather than to single detections
means the policy's cooldown that keeps one snapshot per incident also keeps one page per
incident, and a restarted daemon that re-reads lines it already snapshotted does not page
again.

Each kind of action has its own worker thread behind a bounded queue (FAULTS.md #40): a
webhook that hangs never delays the stop file or the signal that halts a diverging run.
Every call has a total deadline (``timeout_seconds``): for a webhook it covers connect,
send and the whole answer, so a server that trickles its headers one byte at a time is
cut off too (a socket timeout only bounds each ``recv``). A 5xx answer or a refused
connection is retried ``retries`` times with a doubling backoff; every failed attempt is
logged (``Action failed``), never raised. At stop (#39) nothing is lost silently: a
critical action still queued is attempted once with a short deadline, the others are
logged as ``Action dropped``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smart_monitor.config import (
    ActionConfig,
    ActionsConfig,
    CommandActionConfig,
    SignalActionConfig,
    WebhookActionConfig,
)
from smart_monitor.runtime.events import Event, IncidentRecovered, SnapshotFailed, SnapshotMade
from smart_monitor.triggers import Severity, kind_of

if TYPE_CHECKING:
    from smart_monitor.hooks.alertmanager import Alertmanager

__all__ = ["ActionError", "Actions", "Notice", "Worker", "post_json"]

_OUTPUT_TAIL = 300  # characters of a failed command's output kept in the log line
_STOP_SECONDS = 1.5  # at stop: the deadline of a last attempt, and the wait for workers


class ActionError(Exception):
    """An action that ran and failed; the message goes into the ``Action failed`` line.
    ``retry``: a failure that may pass (a 5xx, a refused connection)."""

    def __init__(self, message: str, retry: bool = False) -> None:
        super().__init__(message)
        self.retry = retry


@dataclass(frozen=True, slots=True)
class Notice:
    """What every action is told of a snapshot decision, flattened to plain values (not
    the policy's ``Incident``, which groups detections)."""

    event: str  # "snapshot", "snapshot_failed", or "recovered" (Alertmanager's alone)
    step: int
    severity: str
    triggers: tuple[str, ...]
    kinds: tuple[str, ...]
    snapshot: str | None
    reason: str | None
    incident: str | None = None  # the id of the incident it opened (or that recovered)
    problem: str | None = None
    value: float | None = None  # the first trigger's z-score or value

    @classmethod
    def from_event(cls, event: Event) -> Notice | None:
        if isinstance(event, IncidentRecovered):
            return cls(
                event=event.name, step=event.step, severity=event.severity,
                triggers=(event.peak_trigger,), kinds=(kind_of(event.peak_trigger),),
                snapshot=None if event.snapshot is None else str(event.snapshot), reason=None,
                incident=event.incident, problem=event.problem,
            )
        if not isinstance(event, SnapshotMade | SnapshotFailed):
            return None
        request = event.request
        path = event.path if isinstance(event, SnapshotMade) else None
        opened = request.metadata.get("incident") or {}
        first = request.triggers[0].details if request.triggers else {}
        value = first.get("z", first.get("value"))
        return cls(
            event=event.name,
            step=int(request.step),
            severity=Severity(request.severity).value,
            triggers=tuple(t.name for t in request.triggers),
            kinds=tuple(t.kind for t in request.triggers),
            snapshot=None if path is None else str(path),
            reason=event.reason if isinstance(event, SnapshotFailed) else None,
            incident=opened.get("id"),
            problem=opened.get("problem"),
            value=float(value) if isinstance(value, int | float) else None,
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


def matches(config: ActionConfig, incident: Notice) -> bool:
    """``on_triggers`` names kinds (``loss_nonfinite``) or full names (``loss_zscore_7.10``)."""
    wanted = set(config.on_triggers)
    if wanted & (set(incident.kinds) | set(incident.triggers)):
        return True
    if config.on_severity == "never":
        return False
    return Severity(incident.severity).rank >= Severity(config.on_severity).rank


# -- the four actions: each returns a short detail or raises --------------------------
def write_stop_file(path: Path, incident: Notice) -> str:
    """Atomically, so a trainer polling for the file never reads half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(incident.payload()) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ActionError(f"cannot write {path}: {exc.strerror or exc}") from None
    return str(path)


def send_signal(config: SignalActionConfig, incident: Notice) -> str:
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
    except PermissionError:
        raise ActionError(f"kill {config.signal} {pid}: {_SIGNAL_EPERM}") from None
    except OSError as exc:
        raise ActionError(f"kill {config.signal} {pid}: {exc.strerror or exc}") from None
    return f"{config.signal} {pid}"


_SIGNAL_EPERM = (
    "Operation not permitted: a process may signal only its own user's processes (a "
    "monitor in the trainer's group is not enough; see docs/operations.md): run the "
    "monitor as the trainer's user, or use the stop file action"
)


def signal_refused(config: SignalActionConfig) -> str | None:
    """Whether the process the PID file names exists and refuses our signals (EPERM):
    said once at start, not first when a run is diverging (FAULTS.md #54)."""
    assert config.pidfile is not None
    try:
        pid = int(config.pidfile.read_text(encoding="utf-8").split()[0])
    except (OSError, ValueError, IndexError):
        return None  # not written yet: the action says what it finds when it runs
    try:
        if pid > 1:
            os.kill(pid, 0)  # signal 0: the permission check alone
    except PermissionError:
        return f"{config.pidfile}: PID {pid}: {_SIGNAL_EPERM}"
    except OSError:
        pass  # gone: likewise
    return None


def run_command(config: CommandActionConfig, incident: Notice, timeout: float) -> str:
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


def post_webhook(config: WebhookActionConfig, incident: Notice, timeout: float) -> str:
    return post_json(config.url, json.dumps(incident.payload()).encode(), timeout)


def post_json(target: str, body: bytes, timeout: float) -> str:
    """POST ``body``, all of it (connect, send, answer) within ``timeout`` seconds: a
    timer shuts the socket down at the deadline, which ends any read in progress. The
    URL is a secret (a Slack hook's path is its key): no message here contains it."""
    url = urllib.parse.urlsplit(target)  # the config allows http(s) URLs only
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    conn = kind(url.hostname or "", url.port, timeout=timeout)
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        if conn.sock is not None:
            with contextlib.suppress(OSError):  # closed: the request ended as the timer fired
                conn.sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(timeout, cut)
    timer.daemon = True
    timer.start()
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json",
                                          "User-Agent": "smart-monitor"})
        response = conn.getresponse()
        response.read()
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set() or isinstance(exc, TimeoutError):  # the deadline, or one recv's
            raise ActionError(f"timed out after {timeout:g}s without a whole answer") from None
        refused = isinstance(exc, ConnectionRefusedError)
        raise ActionError(f"POST failed: {exc!r}", retry=refused) from None
    finally:
        timer.cancel()
        conn.close()
    if response.status >= 500:
        raise ActionError(f"HTTP {response.status} {response.reason}", retry=True)
    if response.status >= 400:
        raise ActionError(f"HTTP {response.status} {response.reason}")
    return f"HTTP {response.status}"


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

    def drop_queued(self) -> list[tuple[str, Callable[[], object]]]:
        """Take back the jobs not started yet, oldest first."""
        dropped: list[tuple[str, Callable[[], object]]] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return dropped
            if item is not None:
                dropped.append(item)

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


Run = Callable[[Notice, float], str]  # an action: the incident and a deadline


@dataclass(frozen=True, slots=True)
class _Queued:
    """One action for one incident, as it waits in its kind's queue."""

    actions: Actions
    name: str
    run: Run
    incident: Notice

    def __call__(self) -> None:
        self.actions.attempt(self.name, self.run, self.incident, self.actions.config.retries)


class Actions:
    """The engine listener that queues every configured action an incident matches, on
    the worker of the action's kind. A recovered incident goes to Alertmanager alone
    (its alert ends); the other actions act on snapshot decisions only."""

    def __init__(
        self, config: ActionsConfig, log: Any, alertmanager: Alertmanager | None = None
    ) -> None:
        self.config = config
        self.log = log
        self.alertmanager = alertmanager
        self.stopping = threading.Event()  # ends backoff waits and retries
        self.actions: list[tuple[str, ActionConfig, Run]] = []
        if config.stop_file.path is not None:
            path = config.stop_file.path
            self.actions.append(
                ("stop_file", config.stop_file, lambda i, _t: write_stop_file(path, i))
            )
        if config.signal.pidfile is not None:
            self.actions.append(
                ("signal", config.signal, lambda i, _t: send_signal(config.signal, i))
            )
            refused = signal_refused(config.signal)
            if refused is not None:
                log.warning("Action unavailable", action="signal", error=refused)
        if config.command.argv:
            self.actions.append(
                ("command", config.command, lambda i, t: run_command(config.command, i, t))
            )
        if config.webhook.url:
            self.actions.append(
                ("webhook", config.webhook, lambda i, t: post_webhook(config.webhook, i, t))
            )
        if alertmanager is not None:
            self.actions.append(("alertmanager", alertmanager.config, alertmanager.send))
        self.workers = {
            name: Worker(f"smart-monitor-{name}", config.queue_size, self._crashed)
            for name, _, _ in self.actions
        }

    def __call__(self, event: Event) -> None:
        incident = Notice.from_event(event)
        if incident is None:
            return
        for name, cfg, run in self.actions:
            am = self.alertmanager if name == "alertmanager" else None
            if incident.event == "recovered":  # ends an alert, if one was fired for it
                if am is None or not am.ending(incident):
                    continue
            elif not matches(cfg, incident):
                continue
            elif am is not None:
                am.firing(incident)
            if not self.workers[name].submit(name, _Queued(self, name, run, incident)):
                self.log.error("Action dropped", action=name, step=incident.step,
                               triggers=list(incident.triggers), reason="queue_full")

    def attempt(
        self, name: str, run: Run, incident: Notice, retries: int,
        timeout: float | None = None,
    ) -> bool:
        """Run one action, retrying what may pass with a doubling backoff; every
        failed attempt logged. True when it succeeded."""
        where = {"action": name, "step": incident.step, "triggers": list(incident.triggers),
                 "severity": incident.severity}
        backoff = self.config.retry_backoff_seconds
        for n in range(1, retries + 2):
            try:
                detail = run(incident, timeout or self.config.timeout_seconds)
            except ActionError as exc:
                again = exc.retry and n <= retries and not self.stopping.is_set()
                self.log.error("Action failed", **where, error=str(exc), attempt=n,
                               retry_in=backoff if again else None)
                if not again or self.stopping.wait(backoff):
                    return False
                backoff *= 2
                continue
            self.log.info("Action done", **where, detail=detail, attempt=n)
            return True
        return False

    def _crashed(self, label: str, exc: BaseException) -> None:
        self.log.error("Action failed", action=label, error=repr(exc))

    def stop(self) -> None:
        """Bounded: a critical action still queued gets one attempt with a short
        deadline, in parallel with the others; the rest are logged, never lost silently."""
        self.stopping.set()
        short = min(_STOP_SECONDS, self.config.timeout_seconds)
        if self.alertmanager is not None:
            self.alertmanager.stop()
        last: list[threading.Thread] = []
        for worker in self.workers.values():
            for _label, job in worker.drop_queued():
                assert isinstance(job, _Queued)
                i = job.incident
                if i.severity == "critical":
                    last.append(threading.Thread(
                        target=self.attempt, args=(job.name, job.run, i, 0, short),
                        name=f"smart-monitor-last-{job.name}", daemon=True,
                    ))
                else:
                    self.log.warning("Action dropped", action=job.name, step=i.step,
                                     triggers=list(i.triggers), severity=i.severity,
                                     reason="stopping")
        for t in last:
            t.start()
        deadline = time.monotonic() + _STOP_SECONDS  # one wait for all workers together
        for name, worker in self.workers.items():
            if not worker.stop(max(0.0, deadline - time.monotonic())):  # hung: exit ends it
                self.log.warning("Action dropped", action=name, reason="stopping",
                                 detail="still running at stop")
        for t in last:
            t.join(_STOP_SECONDS + 1)
