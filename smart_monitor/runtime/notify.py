"""systemd's notify protocol (sd_notify(3)), spoken over the ``NOTIFY_SOCKET`` datagram
socket directly: a few lines of stdlib instead of a C binding.

The daemon sends ``READY=1`` once its state is recovered (not after the backlog, which
may take minutes: FAULTS.md #14), ``WATCHDOG=1`` only from the worker loop and only
while it is healthy, so that systemd restarts a wedged process (#29), ``STATUS=...``
when it waits for the metrics file or runs degraded, and ``STOPPING=1`` on stop.
Without ``NOTIFY_SOCKET`` (not under systemd) every call does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]


class Notifier:
    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        addr = env.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):  # abstract namespace
            addr = "\0" + addr[1:]
        self.address = addr or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and ours else None
        self._sock: socket.socket | None = None
        self._status = ""

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; False when not under systemd or
        when the socket is gone (never an exception: notification is best effort)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> None:
        self._status = status
        self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        """Only a change is sent: the worker calls this on every turn."""
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=stopping")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
