"""CSV metric logs: Lightning ``CSVLogger``'s ``metrics.csv`` (one row per
``log_metrics`` call, the columns that call set filled in, the others empty) and
Ultralytics' ``results.csv`` (one row per epoch, space-padded cells, ``epoch`` as the
step). Column names go through the run's ``SeriesBook``, as TensorBoard tags do; the
step is the ``step`` column (``global_step``, ``iteration``), else ``epoch``.

A cell that is not a number (text where a number belongs) or a row shorter than the
header is malformed: counted and logged like a bad JSON line, the rest of the row read.

When a metric appears that the header lacks, the logger rewrites the whole file in
place under a new header, every old row kept in order. That is a replacement, not a
corruption: the reader goes on after the rows it already handled. Because a reader
can catch the rewrite half-done, a file whose header changed but that holds fewer
rows than were handled is waited for, never taken for a new run; only a file that
shrank under the same header is one (read from its first row).

Ultralytics' ``time`` column is the seconds since the trainer started. When it goes
back, another process writes on into the same file (a run appended after a restart):
its row comes after a ``WRITER_STARTED`` entry, as a new event file's first step does.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from smart_monitor.series import SeriesBook, classify
from smart_monitor.sources.steps import WRITER_STARTED, split_step

__all__ = ["CsvFollower"]

_HEAD_MAX = 1 << 16  # a header longer than this is read whole, line by line
_SLICE = 1 << 22  # bytes of rows per read(): a long file is read in slices
_ELAPSED = "time"  # Ultralytics: seconds since the trainer started

EventHandler = Callable[[str, Mapping[str, Any]], None]
Malformed = Callable[[str, str, "int | None"], None]


class CsvFollower:
    """``read()`` returns the entries of the rows completed since the last call (a
    row is complete once its line ends)."""

    def __init__(
        self,
        path: Path,
        book: SeriesBook,
        event: EventHandler,
        malformed: Malformed,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.book = book
        self.event = event
        self.malformed = malformed
        self.header = ""
        self.rows = 0  # data rows handled
        self.offset = 0  # end of the last handled row, under ``header``
        self.ino: int | None = None
        self.elapsed: float | None = None  # the last row's ``time`` cell
        if state:
            self.header = str(state.get("header", ""))
            self.rows = int(state.get("rows", 0))
            self.offset = int(state.get("offset", 0))
            self.ino = state.get("ino")
            self.elapsed = state.get("elapsed")

    @property
    def position(self) -> int:
        return self.offset

    @property
    def pending(self) -> bool:
        return False  # a row is a record: nothing is gathered

    @property
    def mid_record(self) -> bool:
        return False  # a row without its newline is not read until the newline arrives

    def flush(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        pass  # opened and closed by each read

    def state_dict(self) -> dict[str, Any]:
        return {
            "header": self.header, "rows": self.rows, "offset": self.offset, "ino": self.ino,
            "elapsed": self.elapsed,
        }

    def read(self) -> list[dict[str, Any]]:
        with open(self.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            head = fh.readline(_HEAD_MAX)
            while head and not head.endswith(b"\n") and len(head) % _HEAD_MAX == 0:
                head += fh.readline(_HEAD_MAX)
            if not head.endswith(b"\n"):
                return []  # no complete header yet (a new file, or a rewrite under way)
            header = head.decode("utf-8", "replace").rstrip("\r\n")
            skip = 0
            if header == self.header and st.st_ino == self.ino and st.st_size >= self.offset:
                fh.seek(self.offset)  # the common case: rows appended
            elif header == self.header and st.st_ino == self.ino:
                self.event("Metrics file truncated", {"path": str(self.path)})
                self.rows = 0
            elif self.header:  # a new column (or a rename over it): the old rows come first
                skip = self.rows
            if skip:
                data = fh.read()  # past the rows already handled: the file whole
            else:  # a backlog in slices (the caller comes back): memory bounded
                data = fh.read(_SLICE)
                if len(data) == _SLICE and b"\n" not in data:
                    data += fh.readline()  # one row longer than a slice
            offset = fh.tell()
        cut = data.rfind(b"\n") + 1
        offset -= len(data) - cut
        lines = data[:cut].decode("utf-8", "replace").splitlines()
        if len(lines) < skip:
            return []  # a rewrite caught half-done: wait until it holds the handled rows
        if header != self.header and self.header:
            self.event("Metrics file rewritten", {"path": str(self.path), "rows": self.rows})
        self.header, self.ino, self.offset = header, st.st_ino, offset
        return self._entries(header, lines[skip:])

    def _entries(self, header: str, lines: list[str]) -> list[dict[str, Any]]:
        columns = [c.strip() for c in next(csv.reader([header]))]
        names = [self.book.key(c) for c in columns]  # by itself: a CSV has no split folders
        roles = [classify(c).role for c in columns]
        at = roles.index("step") if "step" in roles else (
            columns.index("epoch") if "epoch" in columns else -1
        )
        clock = columns.index(_ELAPSED) if _ELAPSED in columns else -1
        out: list[dict[str, Any]] = []
        for row in csv.reader(lines):
            self.rows += 1
            if len(row) < len(names):
                self.malformed("short_row", f"{self.path.name} row {self.rows}", None)
            values: dict[str, float] = {}
            step: int | None = None
            for i, (name, cell) in enumerate(zip(names, row, strict=False)):
                cell = cell.strip()
                if not cell:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    self.malformed(
                        "bad_cell", f"{self.path.name} row {self.rows} {columns[i]}={cell[:40]!r}",
                        None,
                    )
                    continue
                if i == at:
                    step = int(value) if value.is_integer() and value >= 0 else None
                else:
                    values[name] = value
            if step is not None and values:
                elapsed = values.get(names[clock]) if clock >= 0 else None
                if elapsed is not None:
                    if self.elapsed is not None and elapsed < self.elapsed:
                        out.append({WRITER_STARTED: str(self.path)})
                    self.elapsed = elapsed
                out.extend(split_step(step, values))
        return out
