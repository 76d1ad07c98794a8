"""Which reader a metrics path needs, and the follower of the files it names.

``metrics_file`` may be a JSONL file (the tailer, ``sources/tailer.py``), a TensorBoard
event file or a folder of them, or a Lightning ``metrics.csv`` or a folder holding
one, or a folder holding a JSONL file (the one written last). What the path holds
decides, unless ``[source] format`` forces it. A folder is
searched below (HF writes ``runs/<date>_<host>/events.out.tfevents.*``, Lightning
``lightning_logs/version_N/``), and searched again at every read: a restarted trainer
starts a new file, which is picked up. A folder that holds neither yet (the trainer
has not logged) is decided once it does.

The followers give decoded entries, which go through ``Engine.handle_entries`` like a
``trainer_state.json``'s log history: one pipeline for every format.
"""

from __future__ import annotations

import contextlib
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from smart_monitor.config import RecordsConfig
from smart_monitor.series import SeriesBook
from smart_monitor.sources.steps import WRITER_STARTED
from smart_monitor.sources.tailer import Tailer

__all__ = [
    "EXTRA_HINT", "FolderSource", "SourceError", "detect_format", "open_metrics", "require_reader",
]

Format = Literal["jsonl", "tensorboard", "csv"]
EXTRA_HINT = "pip install 'smart-monitor[tensorboard]'"
_EVENTS = "events.out.tfevents."
_CSV = ("metrics.csv", "results.csv")  # Lightning, Ultralytics
# Folders the search never enters: checkpoints and snapshots hold no metrics.
_SKIP = ("checkpoint-", "tmp-checkpoint-", "anomaly_", ".tmp-", ".")
# A file that ends inside a record is being written: its pending step may have more
# scalars to come, so it waits longer than the quiet period, up to past the writers'
# default flush interval (SummaryWriter and tf.summary: 120 s). A trainer killed
# mid-write still has its last complete step given out.
_MID_RECORD_WAIT = 150.0

EventHandler = Callable[[str, Mapping[str, Any]], None]
Malformed = Callable[[str, str, "int | None"], None]


class SourceError(Exception):
    """The path needs a reader that is not installed: one line, exit 2."""


class _Follower(Protocol):
    @property
    def position(self) -> int: ...

    @property
    def pending(self) -> bool: ...

    @property
    def mid_record(self) -> bool: ...

    def read(self) -> list[dict[str, Any]]: ...

    def flush(self) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def detect_format(path: Path, forced: str = "auto") -> Format | None:
    """The reader ``path`` needs; None for a folder with no metrics file yet.

    >>> detect_format(Path("run/metrics.jsonl")), detect_format(Path("x/metrics.csv"))
    ('jsonl', 'csv')
    >>> detect_format(Path("events.out.tfevents.1.host.2.0"))
    'tensorboard'
    """
    if forced != "auto":
        return forced  # type: ignore[return-value]  # the config's Literal
    if path.is_dir():
        files = _files(path, None)
        if any(p.name.startswith(_EVENTS) for p in files):
            return "tensorboard"
        if files:
            return "csv"
        return "jsonl" if jsonl_in(path) is not None else None
    if _EVENTS in path.name:
        return "tensorboard"
    return "csv" if path.suffix == ".csv" else "jsonl"


def require_reader(fmt: Format | None) -> None:
    """Raise ``SourceError`` naming the extra when ``fmt`` needs one not installed."""
    if fmt != "tensorboard":
        return
    try:
        import smart_monitor.sources.tensorboard  # noqa: F401  # needs the extra
    except ImportError as exc:
        raise SourceError(
            f"reading TensorBoard event files needs the tensorboard extra: {EXTRA_HINT} ({exc})"
        ) from None


def _files(root: Path, fmt: Format | None) -> list[Path]:
    """The metrics files below ``root`` of ``fmt`` (None: of either kind), in the order
    they were started."""
    if not root.is_dir():
        return [root] if root.is_file() else []
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(_SKIP)]
        for name in filenames:
            events = name.startswith(_EVENTS)
            if (events and fmt != "csv") or (name in _CSV and fmt != "tensorboard"):
                found.append(Path(dirpath, name))
    return sorted(found, key=_started)


def jsonl_in(root: Path) -> Path | None:
    """The JSONL file a metrics folder holds (LLaMA-Factory's ``trainer_log.jsonl``, a
    ``metrics.jsonl``): the one written last when there are several; None for none."""
    found: list[tuple[float, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(_SKIP)]
        for name in filenames:
            if name.endswith(".jsonl"):
                with contextlib.suppress(OSError):  # gone between the walk and the stat
                    found.append((os.stat(Path(dirpath, name)).st_mtime, Path(dirpath, name)))
    return max(found)[1] if found else None


def _started(path: Path) -> tuple[float, list[Any]]:
    """Event files by their first event's wall time (the file-version event a writer
    puts first), else the time in their name (``events.out.tfevents.<time>.<host>...``);
    then the path, numbers as numbers (``version_10`` after ``version_9``)."""
    when = 0.0
    if path.name.startswith(_EVENTS):
        found = _first_wall_time(path)
        if found is not None:
            when = found
        else:
            with contextlib.suppress(ValueError):  # a name not of that shape: by path alone
                when = float(path.name[len(_EVENTS) :].split(".", 1)[0])
    parts = re.split(r"(\d+)", str(path))
    return when, [int(p) if p.isdigit() else p for p in parts]


_WALL_TIMES: dict[str, float] = {}  # a file's first event never changes: read once


def _first_wall_time(path: Path) -> float | None:
    """The ``wall_time`` of an event file's first record, read without tensorboard: the
    record is length (8 bytes), its CRC (4), then the ``Event``, whose field 1 (a double,
    tag byte 0x09) comes first. None while the file holds no complete first event."""
    key = str(path)
    if key in _WALL_TIMES:
        return _WALL_TIMES[key]
    try:
        with open(path, "rb") as fh:
            head = fh.read(21)
    except OSError:
        return None
    if len(head) < 21 or head[12] != 0x09:
        return None
    (when,) = struct.unpack("<d", head[13:21])
    _WALL_TIMES[key] = when
    return float(when)


class FolderSource:
    """Follows the TensorBoard or CSV metrics files at ``path``. ``batches()`` yields
    the new entries, oldest file first; a step still being gathered is given out once
    its file was quiet for ``quiet_seconds`` (``deadline``: when the next one is due).
    ``finish()``: every pending step, at the end of a replay. Tags and columns are
    named by ``book`` (the engine's, shared with the ingest), a file's folder below
    ``path`` taking part (Keras's ``validation/``, an ``add_scalars`` subfolder). The first
entries of a file opened afresh come after a ``WRITER_STARTED`` entry: each
``SummaryWriter``, each trainer process, starts a file of its own."""

    def __init__(
        self,
        path: Path,
        fmt: Format | None,
        forced: str,
        aliases: Mapping[str, str],
        quiet_seconds: float,
        event: EventHandler,
        malformed: Malformed,
        clock: Callable[[], float],
        book: SeriesBook | None = None,
    ) -> None:
        self.path = path
        self.fmt = fmt
        self.forced = forced
        self.book = SeriesBook(aliases) if book is None else book
        self.quiet = quiet_seconds
        self.event = event
        self.malformed = malformed
        self.clock = clock
        self.followers: dict[Path, _Follower] = {}
        self._changed: dict[Path, float] = {}  # clock() when a file last gave data
        self._restored: dict[str, Any] = {}
        self._new: set[Path] = set()  # files opened afresh that have given no entry yet
        self._jsonl_said = False

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        files = dict(self._restored)
        files.update({str(p): f.state_dict() for p, f in self.followers.items()})
        return {"format": self.fmt, "files": files}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.fmt is None or state.get("format") in (None, self.fmt):
            self._restored = dict(state.get("files", {}))

    @property
    def waiting(self) -> bool:
        return not self.followers

    @property
    def deadline(self) -> float:
        """When a pending step is due to be given out (inf: none is pending)."""
        due = [self._due(p, f) for p, f in self.followers.items() if f.pending]
        return min(due, default=float("inf"))

    def _due(self, path: Path, f: _Follower) -> float:
        wait = max(self.quiet, _MID_RECORD_WAIT) if f.mid_record else self.quiet
        return self._changed.get(path, self.clock()) + wait

    # -- reading --------------------------------------------------------------------
    def batches(self) -> Iterator[list[dict[str, Any]]]:
        if self.fmt is None:
            self.fmt = detect_format(self.path, self.forced)
            if self.fmt == "jsonl":  # the tailer follows JSONL: chosen at start only
                self.fmt = None
                if not self._jsonl_said:
                    self._jsonl_said = True
                    self.event("Metrics folder holds JSONL: restart to follow it",
                               {"path": str(jsonl_in(self.path))})
            if self.fmt is None:
                return
            require_reader(self.fmt)
        now = self.clock()
        earlier: list[tuple[Path, _Follower]] = []
        for path in _files(self.path, self.fmt):
            f = self.followers.get(path) or self._follow(path)
            if f is None:
                continue
            changed = False
            while True:  # a follower reads a bounded batch: a backlog comes in slices
                before = f.position
                try:
                    entries = f.read()
                except FileNotFoundError:  # deleted between the search and the read
                    entries = f.flush()
                    del self.followers[path]
                entries = self._mark(path, entries)
                if f.position != before:
                    changed = True
                    self._changed[path] = now  # before the yield: the reader may stop there
                if entries:
                    done = [e for p, old in earlier if old.pending for e in self._flush(p, old)]
                    yield done + entries  # a newer file has data: the older ones are done
                if f.position == before or path not in self.followers:
                    break
            if not changed and f.pending and now >= self._due(path, f):
                yield self._flush(path, f)
            earlier.append((path, f))

    def finish(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for path, f in self.followers.items():
            out += self._flush(path, f)
        return out

    def _flush(self, path: Path, f: _Follower) -> list[dict[str, Any]]:
        return self._mark(path, f.flush())

    def _mark(self, path: Path, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``entries`` of the file at ``path``, after ``WRITER_STARTED`` if they are the
        first it gives out since it was opened afresh."""
        if entries and path in self._new:
            self._new.discard(path)
            return [{WRITER_STARTED: str(path)}, *entries]
        return entries

    def close(self) -> None:
        for f in self.followers.values():
            f.close()

    def _follow(self, path: Path) -> _Follower | None:
        state = self._restored.pop(str(path), None)
        folder = path.parent  # its place below the folder followed ("": a file followed)
        place = str(folder.relative_to(self.path)) if folder.is_relative_to(self.path) else ""
        place = "" if place == "." else place
        follower: _Follower
        try:
            if self.fmt == "tensorboard":
                from smart_monitor.sources.tensorboard import EventFileFollower

                follower = EventFileFollower(
                    path, self.book, place, self.event, self.malformed, state
                )
            else:
                from smart_monitor.sources.csv_metrics import CsvFollower

                follower = CsvFollower(path, self.book, self.event, self.malformed, state)
        except FileNotFoundError:
            return None
        if not state:
            self._new.add(path)
        verb = "Resumed" if state else "Opened"
        self.event(f"{verb} metrics file", {"path": str(path), "format": self.fmt})
        self.followers[path] = follower
        self._changed[path] = self.clock()
        return follower


def open_metrics(
    path: Path | None,
    forced: str,
    records: RecordsConfig,
    quiet_seconds: float,
    event: EventHandler,
    malformed: Malformed,
    clock: Callable[[], float],
    book: SeriesBook | None = None,
) -> Tailer | FolderSource | None:
    """The reader of ``metrics_file``: the JSONL tailer, or a follower of TensorBoard
    or CSV files (``records``: the ``[records]`` config, its aliases and line limit;
    ``book``: the run's series, named by the engine's rule)."""
    if path is None:
        return None
    fmt = detect_format(path, forced)
    if fmt == "jsonl":
        found = jsonl_in(path) if path.is_dir() else None  # a folder: its JSONL file
        return Tailer(found or path, records.max_line_bytes, event)
    return FolderSource(
        path, fmt, forced, records.aliases, quiet_seconds, event, malformed, clock, book
    )
