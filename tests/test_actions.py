"""Actions against the real things: a webhook on a loopback HTTP server, a signal to a
real child process, a real command, a real stop file; failures logged, never raised."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from live_daemon import live_daemon
from live_harness import EXAMPLES, log_text, terminate, wait_until

from smart_monitor.config import ConfigError, load_config
from smart_monitor.events import Detected, SnapshotFailed, SnapshotMade
from smart_monitor.hooks.actions import Actions
from smart_monitor.outputs.log import make_logger
from smart_monitor.pipeline import SnapshotRequest
from smart_monitor.triggers import Severity, Trigger


def snapshot_event(
    kind: str = "loss_nonfinite", name: str | None = None, severity: str = "critical",
    step: int = 120, path: str = "/snaps/anomaly_x",
) -> SnapshotMade:
    trigger = Trigger(kind, name or kind, Severity(severity), step)
    request = SnapshotRequest(
        key=f"0:{step}:{trigger.name}", name=trigger.name, step=step,
        severity=Severity(severity), triggers=(trigger,), exact_checkpoint=False, metadata={},
    )
    return SnapshotMade(request, Path(path), 10)


class Logged:
    """A real logger writing the daily file; ``lines()`` reads it back."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path / "logs"
        self.log, self.daily = make_logger(self.dir, stderr=None)

    def lines(self, event: str = "") -> list[str]:
        out: list[str] = []
        for p in sorted(self.dir.glob("*.log")):
            out += [ln for ln in p.read_text().splitlines() if event in ln]
        return out


def make_actions(tmp_path: Path, logged: Logged, **actions: Any) -> Actions:
    return Actions(load_config(actions=actions).actions, logged.log)


class Hook(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.bodies.append(json.loads(body))
        self.server.received.set()
        self.server.release.wait(10)
        self.send_response(self.server.status)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class Receiver(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Hook)
        self.bodies: list[dict[str, Any]] = []
        self.received = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self.status = 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}/hook"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def logged(tmp_path: Path) -> Logged:
    return Logged(tmp_path)


def test_webhook_posts_slack_compatible_json(
    tmp_path: Path, logged: Logged, receiver: Receiver
) -> None:
    actions = make_actions(tmp_path, logged, webhook={"url": receiver.url})
    actions(snapshot_event(step=340))
    actions.stop()
    [body] = receiver.bodies
    assert body["text"].startswith("smart_monitor critical: loss_nonfinite at step 340")
    assert body["triggers"] == ["loss_nonfinite"] and body["step"] == 340
    assert body["snapshot"] == "/snaps/anomaly_x" and body["event"] == "snapshot"
    [done] = logged.lines("Action done")
    assert "action=webhook" in done and "detail=\"HTTP 200\"" in done


def test_webhook_error_status_is_logged_not_raised(
    tmp_path: Path, logged: Logged, receiver: Receiver
) -> None:
    receiver.status = 500
    actions = make_actions(tmp_path, logged, webhook={"url": receiver.url})
    actions(snapshot_event())
    actions.stop()
    [failed] = logged.lines("Action failed")
    assert "action=webhook" in failed and "500" in failed and "triggers=loss_nonfinite" in failed


def test_slow_webhook_never_blocks_the_caller_and_times_out(
    tmp_path: Path, logged: Logged, receiver: Receiver
) -> None:
    receiver.release.clear()  # the server holds every request until released
    actions = make_actions(
        tmp_path, logged, timeout_seconds=0.3, queue_size=1, webhook={"url": receiver.url}
    )
    actions(snapshot_event(step=1))
    assert receiver.received.wait(10)  # the call above returned while the POST hangs
    actions(snapshot_event(step=2))  # queued behind it
    actions(snapshot_event(step=3))  # queue full: dropped, said so
    [dropped] = logged.lines("Action dropped")
    assert "step=3" in dropped and "reason=queue_full" in dropped
    actions.stop()
    failed = logged.lines("Action failed")
    assert len(failed) == 2 and all("timed out" in ln for ln in failed)


def test_signal_stops_a_real_child_process(tmp_path: Path, logged: Logged) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    pidfile = tmp_path / "trainer.pid"
    pidfile.write_text(f"{child.pid}\n")
    actions = make_actions(tmp_path, logged, signal={"pidfile": str(pidfile)})
    try:
        actions(snapshot_event())
        actions.stop()
        assert child.wait(10) == -signal.SIGTERM
    finally:
        child.kill()
        child.wait()
    [done] = logged.lines("Action done")
    assert f'detail="SIGTERM {child.pid}"' in done


@pytest.mark.parametrize("content", [None, "", "garbage", "0", "-1"])
def test_bad_pidfile_is_logged_and_signals_nothing(
    tmp_path: Path, logged: Logged, content: str | None
) -> None:
    pidfile = tmp_path / "trainer.pid"
    if content is not None:
        pidfile.write_text(content)
    actions = make_actions(tmp_path, logged, signal={"pidfile": str(pidfile)})
    actions(snapshot_event())
    actions.stop()
    [failed] = logged.lines("Action failed")
    assert "action=signal" in failed


def test_signal_to_a_process_that_ended_is_logged(tmp_path: Path, logged: Logged) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    pidfile = tmp_path / "trainer.pid"
    pidfile.write_text(str(child.pid))
    actions = make_actions(tmp_path, logged, signal={"pidfile": str(pidfile)})
    actions(snapshot_event())
    actions.stop()
    [failed] = logged.lines("Action failed")
    assert "No such process" in failed


def test_command_gets_trigger_data_in_its_environment(tmp_path: Path, logged: Logged) -> None:
    out = tmp_path / "env.json"
    script = (
        "import json, os, sys; json.dump({k: v for k, v in os.environ.items()"
        " if k.startswith('SMART_MONITOR_')}, open(sys.argv[1], 'w'))"
    )
    actions = make_actions(
        tmp_path, logged, command={"argv": [sys.executable, "-c", script, str(out)]}
    )
    actions(snapshot_event(kind="loss_zscore", name="loss_zscore_12.50", step=77))
    actions.stop()
    env = json.loads(out.read_text())
    assert env == {
        "SMART_MONITOR_EVENT": "snapshot", "SMART_MONITOR_STEP": "77",
        "SMART_MONITOR_SEVERITY": "critical", "SMART_MONITOR_TRIGGERS": "loss_zscore_12.50",
        "SMART_MONITOR_SNAPSHOT": "/snaps/anomaly_x", "SMART_MONITOR_REASON": "",
    }


def test_command_failure_and_timeout_are_logged(tmp_path: Path, logged: Logged) -> None:
    fail = [sys.executable, "-c", "import sys; sys.exit('disk on fire')"]
    actions = make_actions(tmp_path, logged, command={"argv": fail})
    actions(snapshot_event())
    actions.stop()
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    actions = make_actions(tmp_path, logged, timeout_seconds=0.3, command={"argv": hang})
    actions(snapshot_event())
    actions.stop()
    missing = make_actions(tmp_path, logged, command={"argv": [str(tmp_path / "nope")]})
    missing(snapshot_event())
    missing.stop()
    first, second, third = logged.lines("Action failed")
    assert "exit status 1: disk on fire" in first
    assert "timed out after 0.3s" in second
    assert "cannot run" in third


def test_stop_file_only_for_matching_incidents(tmp_path: Path, logged: Logged) -> None:
    stop = tmp_path / "STOP"
    actions = make_actions(
        tmp_path, logged, stop_file={"path": str(stop), "on_triggers": ["divergence_detected"]}
    )
    actions(snapshot_event(kind="loss_spike", name="loss_spike_80.0pct", severity="warning"))
    actions(Detected("divergence_detected", "critical", 5))
    actions.stop()
    assert not stop.exists()  # a warning, and a detection without a snapshot decision

    actions = make_actions(
        tmp_path, logged, stop_file={"path": str(stop), "on_triggers": ["divergence_detected"],
                                     "on_severity": "never"}
    )
    # critical: queued at stop, it still gets its one attempt (a warning would be dropped)
    failed = snapshot_event(kind="divergence_detected", severity="critical").request
    actions(SnapshotFailed(failed, "no_space"))
    actions.stop()
    data = json.loads(stop.read_text())
    assert data["event"] == "snapshot_failed" and data["reason"] == "no_space"
    assert data["triggers"] == ["divergence_detected"]
    assert not list(tmp_path.glob(".STOP.tmp*"))


def test_stop_file_in_a_missing_folder_is_logged(tmp_path: Path, logged: Logged) -> None:
    actions = make_actions(tmp_path, logged, stop_file={"path": str(tmp_path / "no" / "STOP")})
    actions(snapshot_event())
    actions.stop()
    [failed] = logged.lines("Action failed")
    assert "action=stop_file" in failed


def test_nothing_configured_means_no_actions_and_no_thread(tmp_path: Path, logged: Logged) -> None:
    actions = make_actions(tmp_path, logged)
    assert actions.actions == [] and actions.workers == {}
    actions(snapshot_event())
    actions.stop()
    assert logged.lines() == []


@pytest.mark.parametrize(
    ("actions", "key"),
    [
        ({"signal": {"signal": "SIGNOPE"}}, "actions.signal"),
        ({"webhook": {"url": "file:///etc/passwd"}}, "actions.webhook"),
        ({"webhook": {"on_severity": "loud"}}, "actions.webhook.on_severity"),
        ({"command": {"argv": "rm -rf /"}}, "actions.command.argv"),
    ],
)
def test_bad_action_config_names_the_key(actions: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"^{key}"):
        load_config(actions=actions)


def test_live_daemon_signals_the_trainer_and_posts_on_nan(
    tmp_path: Path, receiver: Receiver
) -> None:
    """The whole path: ``smart-monitor run`` beside a simulated trainer that writes its
    own pidfile; a NaN loss at step 300 must stop it long before its 5,000 steps."""
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    pidfile, stop_file = run / "trainer.pid", run / "STOP"
    config = tmp_path / "monitor.toml"
    config.write_text(
        f'[actions.signal]\npidfile = "{pidfile}"\non_triggers = ["loss_nonfinite"]\n'
        f'on_severity = "never"\n[actions.webhook]\nurl = "{receiver.url}"\n'
        f'[actions.stop_file]\npath = "{stop_file}"\n'
    )
    trainer_code = (
        "import os, sys; open(sys.argv[1], 'w').write(str(os.getpid()));"
        f"sys.path.insert(0, {str(EXAMPLES)!r}); from trainer_sim import main; main(sys.argv[2:])"
    )
    with live_daemon(run, out, "--config", str(config)) as daemon:
        trainer = subprocess.Popen(
            [sys.executable, "-c", trainer_code, str(pidfile), "--out", str(run),
             "--steps", "5000", "--rate", "500", "--anomaly", "loss_nonfinite:300"],
            stdout=subprocess.DEVNULL,
        )
        try:
            assert trainer.wait(60) == -signal.SIGTERM
        finally:
            trainer.kill()
            trainer.wait()
        wait_until(lambda: len(receiver.bodies) >= 1, "the webhook", 30)
        assert terminate(daemon) == 0
    [body] = [b for b in receiver.bodies if b["triggers"] == ["loss_nonfinite"]]
    assert body["step"] == 300 and "anomaly_" in body["snapshot"]
    assert json.loads(stop_file.read_text())["triggers"] == ["loss_nonfinite"]
    logs = log_text(out)
    assert "Action done action=signal step=300 triggers=loss_nonfinite" in logs
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 300 <= last["step"] < 5000
