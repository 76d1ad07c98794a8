"""The ``alertmanager`` action: each incident as an alert to Alertmanager's v2 API.

Alertmanager already groups, deduplicates, silences, inhibits and routes alerts from
many senders; this action only speaks its protocol, the way Prometheus does: an alert
is a label set (``alertname`` from the incident's problem, ``severity``, ``run``,
``host``) posted with an ``endsAt`` a few re-send intervals ahead, re-posted every
``resend_seconds`` while its incident is open, and posted once more with ``endsAt`` =
now when the incident recovers. A monitor that dies stops re-sending, so its alerts
expire on their own (and the ``SmartMonitorDown`` rule says why). Several URLs (an HA
pair) are all posted to, in parallel, each within the action's deadline: Alertmanager
peers deduplicate what they both receive.

Which recoveries are due is decided on the engine's thread as the events come; the
alerts themselves are built on the worker, in the same order (one worker per action
kind, FIFO), so a recovery never overtakes its firing.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from smart_monitor.config import AlertmanagerActionConfig
from smart_monitor.hooks.actions import ActionError, Notice, post_json
from smart_monitor.triggers import problem_of

__all__ = ["API_PATH", "Alertmanager", "alert_name"]

API_PATH = "/api/v2/alerts"
_EXPIRY_RESENDS = 4  # an alert not re-sent within this many intervals resolves (Prometheus's)

Alert = dict[str, Any]


def alert_name(problem: str) -> str:
    """``loss_spike`` -> ``SmartMonitorLossSpike``: Prometheus's alert-name style, so the
    monitor's alerts sort beside the rules' (``deploy/prometheus``)."""
    return "SmartMonitor" + "".join(part.capitalize() for part in problem.split("_"))


def _stamp(when: datetime) -> str:
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Alertmanager:
    """The open alerts (by incident id) and the thread that re-sends them."""

    def __init__(
        self, config: AlertmanagerActionConfig, identity: Mapping[str, str], log: Any,
        timeout: float, now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self.identity = dict(identity)
        self.log = log
        self.timeout = timeout
        self.now = now
        self.open: dict[str, Alert] = {}
        self._fired: set[str] = set()  # incidents whose alert is queued or open
        self._lock = threading.Lock()  # the worker changes ``open``, the re-sender reads it
        self._stopping = threading.Event()
        self._thread = threading.Thread(
            target=self._resend_loop, name="smart-monitor-alertmanager-resend", daemon=True
        )
        self._thread.start()

    # -- on the engine's thread, as the events come -----------------------------------
    def firing(self, notice: Notice) -> None:
        """A notice queued for this action: its incident's recovery will be due."""
        if notice.incident is not None:
            self._fired.add(notice.incident)

    def ending(self, notice: Notice) -> bool:
        """Whether this recovery ends an alert fired for it (an incident below
        ``on_severity`` recovers without a word)."""
        if notice.incident not in self._fired:
            return False
        self._fired.discard(notice.incident)
        return True

    # -- the action (on its worker) ---------------------------------------------------
    def send(self, notice: Notice, timeout: float) -> str:
        """Fire the notice's alert, or resolve its incident's; post them to every URL."""
        with self._lock:
            alerts = self._resolve(notice) if notice.event == "recovered" else self._fire(notice)
        if not alerts:
            return "no alert open for it"
        return self.post(alerts, timeout)

    def _fire(self, notice: Notice) -> list[Alert]:
        now = self.now()
        problem = notice.problem or problem_of(notice.kinds[0] if notice.kinds else "anomaly")
        labels = {"alertname": alert_name(problem), "severity": notice.severity,
                  **self.identity}
        value = "" if notice.value is None else f"{notice.value:g}"
        run, host = self.identity.get("run", ""), self.identity.get("host", "")
        alert: Alert = {
            "labels": labels,
            "annotations": {
                "summary": f"{', '.join(notice.triggers)} on run {run} ({host}) at step"
                           f" {notice.step}",
                "step": str(notice.step),
                "trigger": ",".join(notice.triggers),
                "snapshot": notice.snapshot or f"failed: {notice.reason}",
                "value": value,
                "incident": notice.incident or "",
            },
            "startsAt": _stamp(now),
            "endsAt": _stamp(now + self._expiry()),
        }
        if notice.incident is None:  # a one-off (no incident will close it): it expires
            return [alert]
        out = [alert]
        before = self.open.get(notice.incident)
        if before is not None:
            alert["startsAt"] = before["startsAt"]
            if before["labels"] != labels:  # escalated: the old label set ends now
                out.append({**before, "endsAt": _stamp(now)})
        self.open[notice.incident] = alert
        return out

    def _resolve(self, notice: Notice) -> list[Alert]:
        alert = self.open.pop(notice.incident or "", None)
        if alert is None:
            return []
        annotations = {**alert["annotations"], "recovered_step": str(notice.step)}
        return [{**alert, "annotations": annotations, "endsAt": _stamp(self.now())}]

    def _expiry(self) -> timedelta:
        return timedelta(seconds=_EXPIRY_RESENDS * self.config.resend_seconds)

    # -- posting ------------------------------------------------------------------------
    def post(self, alerts: list[Alert], timeout: float) -> str:
        """POST to every URL at once, each bounded by ``timeout``. Raises when any
        failed (a retry re-posts to all: Alertmanager deduplicates)."""
        body = json.dumps(alerts).encode()
        results: dict[str, str | ActionError] = {}

        def one(url: str) -> None:
            try:
                results[url] = post_json(url.rstrip("/") + API_PATH, body, timeout)
            except ActionError as exc:
                results[url] = exc

        threads = [threading.Thread(target=one, args=(u,), daemon=True) for u in self.config.urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 1)  # post_json ends itself at its deadline
        failed = [r for r in results.values() if isinstance(r, ActionError)]
        done = len(results) - len(failed)
        if failed or done < len(threads):
            what = "; ".join(str(f) for f in failed) or "no answer"
            raise ActionError(
                f"{len(threads) - done} of {len(threads)} Alertmanagers failed: {what}",
                retry=any(f.retry for f in failed),
            )
        return f"{len(alerts)} alert(s) to {done} Alertmanager(s)"

    # -- re-sending ---------------------------------------------------------------------
    def _resend_loop(self) -> None:
        while not self._stopping.wait(self.config.resend_seconds):
            self.resend()

    def resend(self) -> None:
        """Re-post every open alert with a fresh ``endsAt``; a failure is logged, and the
        next interval is its retry."""
        ends = _stamp(self.now() + self._expiry())
        with self._lock:
            for alert in self.open.values():
                alert["endsAt"] = ends
            alerts = [dict(a) for a in self.open.values()]
        if not alerts:
            return
        try:
            detail = self.post(alerts, self.timeout)
        except ActionError as exc:
            self.log.error("Action failed", action="alertmanager", error=str(exc),
                           detail="re-send", incidents=len(alerts))
            return
        self.log.debug("Action done", action="alertmanager", detail=f"re-sent {detail}")

    def stop(self) -> None:
        """End the re-sends, without waiting: a re-send in flight ends at its deadline
        by itself. The open alerts are left to expire at their ``endsAt``: their
        incidents did not recover, so no ``endsAt`` = now is due (a monitor that
        restarts does not re-fire them: its next incident will)."""
        self._stopping.set()

