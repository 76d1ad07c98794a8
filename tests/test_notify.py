"""sd_notify over a real datagram socket, as systemd listens for it."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from smart_monitor.runtime.notify import Notifier


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def recv(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_ready_status_watchdog_stopping(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000"})
    assert n.watchdog_interval == 2.0
    n.ready("following (inotify)")
    msg = recv(sock)
    assert msg[0] == "READY=1" and "STATUS=following (inotify)" in msg
    assert f"MAINPID={os.getpid()}" in msg
    n.status("following (inotify)")  # unchanged: nothing sent
    n.status("degraded: polling")
    assert recv(sock) == ["STATUS=degraded: polling"]
    n.watchdog()
    assert recv(sock) == ["WATCHDOG=1"]
    n.stopping()
    assert recv(sock)[0] == "STOPPING=1"
    n.close()


def test_abstract_socket_address() -> None:
    name = f"smart-monitor-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert recv(sock) == ["WATCHDOG=1"]
    finally:
        sock.close()


def test_not_under_systemd_does_nothing() -> None:
    n = Notifier({})
    assert n.send("READY=1") is False
    assert n.watchdog_interval is None


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    n = Notifier({"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"})
    assert n.watchdog_interval is None
    assert n.send("WATCHDOG=1") is False  # a vanished socket is not an error
