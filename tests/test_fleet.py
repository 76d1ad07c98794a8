"""A fleet of runs against the real servers (docs/fleet.md): Debian's ``prometheus``
scraping two monitors with the shipped rules, and ``prometheus-alertmanager`` taking
the ``alertmanager`` action's alerts and notifying a webhook receiver. ``make test``
installs both when missing; without them these tests fail, never skip. Loopback only,
free ports, short scrape and group intervals, every wait on a condition."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import shutil
import socket
import subprocess
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from live_harness import Live, append, config, line, wait_until

from smart_monitor.config import load_config, run_name
from smart_monitor.events import IncidentRecovered, SnapshotMade
from smart_monitor.hooks.actions import Actions, Notice
from smart_monitor.hooks.alertmanager import Alertmanager
from smart_monitor.outputs.log import make_logger
from smart_monitor.pipeline import SnapshotRequest
from smart_monitor.triggers import Severity, Trigger

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "smart_monitor_rules.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "smart_monitor.json"
DEV = Path("/work/shared/real-runs/dev")
NAN_RUN = DEV / "pypi-data__pypi-mirror-359__nlpia2_RNN_RELU_2l_12ep.jsonl"  # NaN throughout
CLEAN_RUN = DEV / "pypi-data__pypi-mirror-359__nlpia2_LSTM_2l_12ep.jsonl"  # the same program, clean
PROMETHEUS = "/usr/bin/prometheus"
ALERTMANAGER = "/usr/bin/prometheus-alertmanager"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def server(argv: list[str], ready: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start a real server, wait until ``ready`` answers 200, stop it at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: answers(ready) or proc.poll() is not None, f"{argv[0]} ready")
        assert proc.poll() is None, log.read_text()[-2000:]
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def monitor(tmp_path: Path, name: str, source: Path | None, **overrides: Any) -> Live:
    """A daemon following ``<name>/metrics.jsonl``, a copy of ``source`` (None: not
    written yet); its run folder's name is its ``run`` label."""
    run = tmp_path / name
    run.mkdir()
    if source is not None:
        shutil.copy(source, run / "metrics.jsonl")
    return Live(config(tmp_path / f"{name}-monitor", metrics_file=run / "metrics.jsonl",
                       checkpoint_dir=run, **overrides))


def prometheus_config(tmp_path: Path, targets: list[int]) -> Path:
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "smart_monitor", "honor_labels": True,  # as docs/fleet.md
            "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in targets]}],
        }],
    }))
    return path


def test_the_run_label_defaults_to_the_run_folder(tmp_path: Path) -> None:
    """``[metrics] run``, else the checkpoint folder, else the metrics file's folder (a
    folder of event files: its own name)."""
    tb = tmp_path / "bert-tb"
    tb.mkdir()
    assert run_name(load_config(metrics_file=tmp_path / "exp1" / "metrics.jsonl")) == "exp1"
    assert run_name(load_config(metrics_file=tb)) == "bert-tb"
    assert run_name(load_config(metrics_file=tb, checkpoint_dir=tmp_path / "gpt")) == "gpt"
    assert run_name(load_config(checkpoint_dir=tmp_path / "gpt", metrics={"run": "a"})) == "a"


def test_every_rule_has_severity_a_summary_and_a_runbook_in_docs() -> None:
    """The rules' runbook links land on headings of docs/fleet.md (GitHub's anchors)."""
    doc = (ROOT / "docs" / "fleet.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#+ (.+)$", doc, re.M)}
    rules = RULES.read_text()
    names = re.findall(r"^      - alert: (\w+)$", rules, re.M)
    links = re.findall(r"runbook_url: docs/fleet\.md#([\w-]+)$", rules, re.M)
    assert len(names) == len(links) == rules.count("severity:") == rules.count("summary:") == 8
    assert set(links) <= anchors, set(links) - anchors


# -- Prometheus: two runs, the shipped rules, the dashboard's queries -----------------
def test_rules_fire_for_the_nan_run_only_and_every_panel_evaluates(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    runs = {}
    for (name, source), port in zip(
        (("rnn-relu", NAN_RUN), ("lstm", CLEAN_RUN)), ports, strict=True
    ):
        runs[name] = monitor(tmp_path, name, source, metrics={"port": port})
    web = f"127.0.0.1:{free_port()}"
    argv = [PROMETHEUS, f"--config.file={prometheus_config(tmp_path, ports)}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address={web}"]
    api = f"http://{web}/api/v1"
    try:
        with server(argv, f"http://{web}/-/ready", tmp_path / "prometheus.log"):
            def records(run: str) -> float:
                q = urllib.parse.quote(f'smart_monitor_records_total{{run="{run}"}}')
                result = get_json(f"{api}/query?query={q}")["data"]["result"]
                return float(result[0]["value"][1]) if result else -1.0

            wait_until(lambda: records("rnn-relu") == records("lstm") == 180,
                       "both runs read to the end, as Prometheus scraped them")
            complete = datetime.now(UTC)

            def alerts() -> list[dict[str, Any]]:
                return list(get_json(f"{api}/alerts")["data"]["alerts"])

            def nan_alert() -> bool:
                return any(a["labels"]["alertname"] == "SmartMonitorNonFiniteLoss"
                           and a["state"] == "firing" for a in alerts())

            wait_until(nan_alert, "SmartMonitorNonFiniteLoss firing")

            def evaluated_since_complete() -> bool:
                [group] = get_json(f"{api}/rules")["data"]["groups"]
                last = datetime.fromisoformat(group["lastEvaluation"].replace("Z", "+00:00"))
                return last > complete + timedelta(seconds=2)  # a scrape, then an evaluation

            wait_until(evaluated_since_complete, "a rule evaluation after the last scrape")
            # Firing alerts are what Alertmanager is sent. The health rules wait (`for:`)
            # and may be pending here for the test machine's own reasons (its disk under
            # the 15 % free-space floor, inotify limits reached, a scrape over its 1 s timeout
            # on a loaded machine): never the runs'.
            everything = alerts()
            fired = [a for a in everything if a["state"] == "firing"]
            pending = {a["labels"]["alertname"] for a in everything if a["state"] != "firing"}
            panels = evaluate_dashboard(api)
    finally:
        for live in runs.values():
            live.stop()
    assert len(fired) == 1, fired  # the NaN run's incident: one alert, none for the clean run
    [alert] = fired
    assert pending <= {"SmartMonitorDegraded", "SmartMonitorDown",
                       "SmartMonitorSnapshotBudgetNearFull"}, pending
    assert alert["labels"]["run"] == "rnn-relu"
    assert alert["labels"]["severity"] == "critical"
    assert alert["annotations"]["summary"] == (
        f"Non-finite loss_nonfinite on run rnn-relu ({socket.gethostname()}) since step 200"
    )
    assert alert["annotations"]["runbook_url"] == "docs/fleet.md#non-finite-loss"
    for title, runs_seen in panels.items():  # every run has its row
        if title in ("Loss", "Learning rate", "Snapshot budget", "Monitor"):
            assert runs_seen == {"rnn-relu", "lstm"}, title


def evaluate_dashboard(api: str) -> dict[str, set[str]]:
    """Every query of every panel, with the dashboard's variables filled in as Grafana
    would, evaluated by Prometheus: none may fail. Returns the runs each panel shows."""
    dashboard = json.loads(DASHBOARD.read_text())
    variable = dashboard["templating"]["list"][1]["query"]["query"]
    assert variable == "label_values(smart_monitor_records_total, run)"
    seen: dict[str, set[str]] = {}
    panels = dashboard["panels"]
    assert panels[0]["type"] == "row" and panels[0]["repeat"] == "run"
    for panel in panels[1:]:
        seen[panel["title"]] = set()
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "1m")
            expr = re.sub(r'run=~"\$run"', 'run=~"rnn-relu|lstm"', expr)
            assert "$" not in expr, expr
            answer = get_json(f"{api}/query?query={urllib.parse.quote(expr)}")
            assert answer["status"] == "success", (panel["title"], expr, answer)
            seen[panel["title"]] |= {r["metric"].get("run", "") for r in answer["data"]["result"]}
    return seen


# -- Alertmanager: a grouped notification, its resolution, a silence, and down ---------
class Receiver(http.server.ThreadingHTTPServer):
    """Alertmanager's webhook receiver, and a second "Alertmanager" that only records
    what it is sent (the other half of an HA pair)."""

    daemon_threads = True

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.posts.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def alertmanager_config(tmp_path: Path, hook: str) -> Path:
    path = tmp_path / "alertmanager.yml"
    path.write_text(json.dumps({
        "route": {"receiver": "hook", "group_by": ["alertname", "run"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "hook",
                       "webhook_configs": [{"url": hook, "send_resolved": True}]}],
    }))
    return path


def test_alertmanager_groups_resolves_silences_and_its_absence_harms_nothing(
    tmp_path: Path,
) -> None:
    hook, peer = Receiver(), Receiver()
    web = f"127.0.0.1:{free_port()}"
    argv = [ALERTMANAGER, f"--config.file={alertmanager_config(tmp_path, hook.url)}",
            f"--storage.path={tmp_path / 'am'}", f"--web.listen-address={web}",
            "--cluster.listen-address="]  # no gossip port: one instance, loopback only
    am = f"http://{web}"
    live = monitor(
        tmp_path, "gpt", None,
        actions={"alertmanager": {"urls": [am, peer.url], "resend_seconds": 1},
                 "retries": 0},
        policy={"cooldown_steps": 0, "recovery_steps": 5, "recovery_records": 3},
    )
    metrics = live.config.metrics_file
    assert metrics is not None

    def notifications(status: str) -> list[dict[str, Any]]:
        """The receiver's notifications about this run (not the canary's)."""
        return [body for _, body in hook.posts
                if body["status"] == status and body["groupLabels"].get("run") == "gpt"]

    try:
        with server(argv, f"{am}/-/ready", tmp_path / "alertmanager.log") as proc:
            append(metrics, b"".join(line(s) for s in range(1, 31)) + line(31, float("nan")))
            wait_until(lambda: notifications("firing"), "a firing notification")
            wait_until(lambda: len([p for p in peer.posts if p[0] == "/api/v2/alerts"]) >= 2,
                       "the HA peer posted to, then re-sent to")
            append(metrics, b"".join(line(s) for s in range(32, 40)))
            wait_until(lambda: notifications("resolved"), "a resolved notification")
            [firing], [resolved] = notifications("firing"), notifications("resolved")

            # a silence on this run's non-finite alerts: the next incident is not notified
            silence = {"matchers": [{"name": "run", "value": "gpt", "isRegex": False},
                                    {"name": "alertname", "value": "SmartMonitorNonfinite",
                                     "isRegex": False}],
                       "startsAt": datetime.now(UTC).isoformat(),
                       "endsAt": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
                       "createdBy": "test", "comment": "maintenance"}
            request = urllib.request.Request(
                f"{am}/api/v2/silences", json.dumps(silence).encode(),
                {"Content-Type": "application/json"},
            )
            urllib.request.urlopen(request, timeout=10).close()
            append(metrics, line(40, float("nan")))

            def suppressed() -> bool:
                return any(a["status"]["state"] == "suppressed"
                           for a in get_json(f"{am}/api/v2/alerts"))

            wait_until(suppressed, "the silenced alert held by Alertmanager")
            canary = [{"labels": {"alertname": "Canary", "run": "other"}}]
            request = urllib.request.Request(f"{am}/api/v2/alerts", json.dumps(canary).encode(),
                                             {"Content-Type": "application/json"})
            urllib.request.urlopen(request, timeout=10).close()
            wait_until(lambda: any(b["groupLabels"].get("alertname") == "Canary"
                                   for _, b in hook.posts), "the canary's notification")
            during_silence = len(notifications("firing"))

            proc.terminate()  # Alertmanager down: the monitor goes on
            proc.wait(20)
            before = live.records
            append(metrics, b"".join(line(s) for s in range(41, 50)) + line(50, float("nan"))
                   + b"".join(line(s) for s in range(51, 60)))
            live.wait_records(before + 19)
            live.wait_log("Action failed action=alertmanager")
    finally:
        live.stop()
        for receiver in (hook, peer):
            receiver.shutdown()
            receiver.server_close()
    assert len(firing["alerts"]) == 1 and firing["groupLabels"] == {
        "alertname": "SmartMonitorNonfinite", "run": "gpt"}
    alert = firing["alerts"][0]
    assert alert["labels"] == {"alertname": "SmartMonitorNonfinite", "severity": "critical",
                               "run": "gpt", "host": socket.gethostname()}
    assert alert["annotations"]["step"] == "31"
    assert alert["annotations"]["trigger"] == "loss_nonfinite"
    assert alert["annotations"]["snapshot"].startswith(str(live.config.snapshot_dir))
    assert resolved["alerts"][0]["labels"] == alert["labels"]
    assert resolved["alerts"][0]["annotations"]["recovered_step"] != ""
    assert during_silence == 1  # the silenced incident was not notified
    assert live.code == 0
    log = live.log()
    assert "Action done action=alertmanager" in log
    assert "Traceback" not in log


# -- the action's alert lifecycle, against a recording receiver -------------------------
def incident_event(
    kind: str, severity: str, step: int, incident: str, problem: str
) -> SnapshotMade:
    trigger = Trigger(kind, kind, Severity(severity), step, {"value": 7.5})
    request = SnapshotRequest(
        key=f"0:{step}:{kind}", name=kind, step=step, severity=Severity(severity),
        triggers=(trigger,), exact_checkpoint=False,
        metadata={"incident": {"id": incident, "problem": problem}},
    )
    return SnapshotMade(request, Path(f"/snaps/{kind}_{step}"), 10)


def test_escalation_ends_the_warning_alert_and_recoveries_end_only_what_fired(
    tmp_path: Path,
) -> None:
    receiver = Receiver()
    cfg = load_config(actions={"alertmanager": {"urls": [receiver.url], "resend_seconds": 600}})
    log, _ = make_logger(tmp_path / "logs", stderr=None)
    am = Alertmanager(cfg.actions.alertmanager, {"run": "gpt", "host": "n1"}, log, 5.0)
    actions = Actions(cfg.actions, log, am)
    try:
        actions(incident_event("loss_spike", "warning", 100, "loss_spike@100", "loss_spike"))
        actions(incident_event("loss_zscore", "critical", 104, "loss_spike@100", "loss_spike"))
        actions(IncidentRecovered("lr_zscore@50", "lr_zscore", 50, 110, "warning", "lr_zscore_7",
                                  None))  # never fired (no snapshot): ends nothing
        actions(IncidentRecovered("loss_spike@100", "loss_spike", 100, 300, "critical",
                                  "loss_zscore_12.5", Path("/snaps/loss_spike_100")))
        wait_until(lambda: len(receiver.posts) == 3, "three posts")
        am.resend()  # nothing open any more: nothing to post
    finally:
        actions.stop()
        receiver.shutdown()
        receiver.server_close()
    first, escalated, recovered = (body for _, body in receiver.posts)
    assert [a["labels"]["severity"] for a in escalated] == ["critical", "warning"]
    warning_end = datetime.fromisoformat(escalated[1]["endsAt"].replace("Z", "+00:00"))
    assert warning_end <= datetime.now(UTC)  # the warning alert ends as the critical fires
    assert first[0]["labels"] == escalated[1]["labels"]
    assert escalated[0]["startsAt"] == first[0]["startsAt"]  # one incident, one start
    assert escalated[0]["annotations"]["value"] == "7.5"
    assert escalated[0]["labels"] == {"alertname": "SmartMonitorLossSpike",
                                      "severity": "critical", "run": "gpt", "host": "n1"}
    [ended] = recovered
    assert ended["labels"] == escalated[0]["labels"]
    assert ended["annotations"]["recovered_step"] == "300"
    assert am.open == {}


def test_open_alerts_are_re_sent_with_a_fresh_end(tmp_path: Path) -> None:
    receiver = Receiver()
    cfg = load_config(actions={"alertmanager": {"urls": [receiver.url], "resend_seconds": 600}})
    log, _ = make_logger(tmp_path / "logs", stderr=None)
    clock = [datetime(2026, 1, 1, tzinfo=UTC)]
    am = Alertmanager(cfg.actions.alertmanager, {"run": "gpt", "host": "n1"}, log, 5.0,
                      now=lambda: clock[0])
    try:
        notice = Notice.from_event(incident_event("loss_nonfinite", "critical", 9, "nonfinite@9",
                                                  "nonfinite"))
        assert notice is not None
        am.send(notice, 5.0)
        clock[0] += timedelta(minutes=30)
        am.resend()
    finally:
        am.stop()
        receiver.shutdown()
        receiver.server_close()
    [fired], [again] = (body for _, body in receiver.posts)
    assert fired["endsAt"] == "2026-01-01T00:40:00.000Z"  # four re-send intervals ahead
    assert again["endsAt"] == "2026-01-01T01:10:00.000Z"
    assert again["startsAt"] == fired["startsAt"] == "2026-01-01T00:00:00.000Z"
