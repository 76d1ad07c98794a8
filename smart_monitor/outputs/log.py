"""structlog set-up: one event per line, to the daily log file and to stderr.

Text lines follow DESIGN.md exactly::

    2026-11-29T17:00:00.123Z warning Created snapshot step=17500 triggers=a,b severity=warning ...

Values are quoted only when they hold a space, a quote or an ``=``, so
``grep -o 'triggers=[^ ]*'`` works on every line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import threading
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

import orjson

__all__ = ["DailyFile", "make_logger", "render_text"]

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}


def _utc_now() -> datetime:
    return datetime.now(UTC)


class DailyFile:
    """``log_dir/smart_monitor_YYYYMMDD.log`` (UTC date), appended line by line and
    re-opened when the date changes or on ``reopen()`` (SIGHUP, after logrotate).

    A write that fails (ENOSPC, EDQUOT, EIO, EACCES: FAULTS.md #32) never reaches the
    caller: a full log disk must not stop the monitor. The line still goes to stderr
    (journald under systemd), ``lost`` counts the lines the file missed and ``error``
    says why, for ``STATUS=``; the next line tries the file again, and the first one
    that lands is preceded by a ``Log file resumed`` line with the count, rendered as
    every other line (``render``: a JSON log stays JSON lines).

    Each line is one unbuffered ``write()`` to an ``O_APPEND`` descriptor: a disk that
    fills mid-line leaves a short write, which is cut off again (``ftruncate`` to where
    the line began), so the file never holds a torn line (FAULTS.md #64)."""

    def __init__(
        self,
        log_dir: Path,
        clock: Callable[[], datetime] = _utc_now,
        render: Callable[[MutableMapping[str, Any]], str] | None = None,
    ) -> None:
        self.log_dir = log_dir
        self.clock = clock
        self.render = render or render_text
        self._lock = threading.Lock()
        self._day = ""
        self._fd: int | None = None
        self.lost = 0  # lines not written to the file, since start
        self.error: str | None = None  # why the last write failed; None once one works
        self._lost_since = 0

    def path_for(self, day: str) -> Path:
        return self.log_dir / f"smart_monitor_{day}.log"

    def write(self, line: str) -> None:
        now = self.clock()
        day = now.strftime("%Y%m%d")
        with self._lock:
            try:
                if day != self._day or self._fd is None:
                    self._open(day)
                assert self._fd is not None
                text = line + "\n"
                if self._lost_since:
                    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
                    text = self.render({
                        "event": "Log file resumed", "lost": self._lost_since,
                        "lost_total": self.lost, "timestamp": stamp, "level": "warning",
                    }) + "\n" + text
                self._append(self._fd, text.encode("utf-8", "replace"))
            except OSError as exc:
                self._failed(exc)
                return
            self._lost_since = 0
            self.error = None

    @staticmethod
    def _append(fd: int, data: bytes) -> None:
        """``data`` whole, or nothing: a short write is cut off again."""
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = os.write(fd, data)
        except OSError:
            _cut(fd, start)  # a failed write may still have landed part of the line
            raise
        if written < len(data):  # the disk filled mid-line
            _cut(fd, start)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def _failed(self, exc: OSError) -> None:
        self.lost += 1
        self._lost_since += 1
        self.error = f"{self.path_for(self._day or 'YYYYMMDD')}: {exc.strerror or exc}"
        self._close()

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _open(self, day: str) -> None:
        self._close()
        self._day = day
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(
            self.path_for(day), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666
        )

    def reopen(self) -> None:
        with self._lock:
            self._close()

    def close(self) -> None:
        self.reopen()


def _cut(fd: int, size: int) -> None:
    with contextlib.suppress(OSError):  # freeing blocks works on a full disk
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)


def _quote(value: Any) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def render_text(event: MutableMapping[str, Any]) -> str:
    ts = event.pop("timestamp")
    level = event.pop("level")
    text = event.pop("event")
    pairs = " ".join(f"{k}={_quote(v)}" for k, v in event.items() if v is not None)
    return f"{ts} {level} {text}" + (f" {pairs}" if pairs else "")


def render_json(event: MutableMapping[str, Any]) -> str:
    return orjson.dumps(event, default=str, option=orjson.OPT_SERIALIZE_NUMPY).decode()


class _Sink:
    """The logger structlog wraps: writes the rendered line to every output."""

    def __init__(self, outputs: list[Callable[[str], None]]) -> None:
        self.outputs = outputs

    def msg(self, line: str) -> None:
        for out in self.outputs:
            out(line)

    debug = info = warning = error = critical = msg


def _timestamp(clock: Callable[[], datetime]) -> Callable[..., MutableMapping[str, Any]]:
    def add(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        now = clock()
        event["timestamp"] = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"
        return event

    return add


def _add_level(_: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["level"] = method
    return event


def make_logger(
    log_dir: Path | None,
    log_format: Literal["text", "json"] = "text",
    level: str = "info",
    stderr: TextIO | None = sys.stderr,
    clock: Callable[[], datetime] = _utc_now,
) -> tuple[Any, DailyFile | None]:
    """A bound logger for one monitor instance (no global structlog state), and the
    daily file it writes, for ``reopen()`` on SIGHUP."""
    outputs: list[Callable[[str], None]] = []
    import structlog  # here: ``run`` keeps its optional imports out first (cli.py)

    renderer = render_text if log_format == "text" else render_json
    daily = DailyFile(log_dir, clock, renderer) if log_dir is not None else None
    if daily is not None:
        outputs.append(daily.write)
    if stderr is not None:
        err = stderr

        def to_stderr(line: str) -> None:
            err.write(line + "\n")
            err.flush()

        outputs.append(to_stderr)
    logger = structlog.wrap_logger(
        _Sink(outputs),
        processors=[_timestamp(clock), _add_level, lambda _, __, e: renderer(e)],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=False,
    )
    return logger, daily
