"""Lightning ``CSVLogger``'s ``metrics.csv``: one row per ``log_metrics`` call, the
columns that call set filled in, the others empty.

When a metric appears that the header lacks, the logger rewrites the whole file in
place under a new header, every old row kept in order. That is a replacement, not a
corruption: the reader goes on after the rows it already handled. Because a reader
can catch the rewrite half-done, a file whose header changed but that holds fewer
rows than were handled is waited for, never taken for a new run; only a file that
shrank under the same header is one (read from its first row).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from smart_monitor.sources.tensorboard import split_step, tag_key

__all__ = ["CsvFollower"]

_HEAD_MAX = 1 << 16  # a header longer than this is read whole, line by line

EventHandler = Callable[[str, Mapping[str, Any]], None]


class CsvFollower:
    """``read()`` returns the entries of the rows completed since the last call (a
    row is complete once its line ends)."""

    def __init__(
        self,
        path: Path,
        aliases: Mapping[str, str],
        event: EventHandler,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.aliases = dict(aliases)
        self.event = event
        self.header = ""
        self.rows = 0  # data rows handled
        self.offset = 0  # end of the last handled row, under ``header``
        self.ino: int | None = None
        if state:
            self.header = str(state.get("header", ""))
            self.rows = int(state.get("rows", 0))
            self.offset = int(state.get("offset", 0))
            self.ino = state.get("ino")

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
        return {"header": self.header, "rows": self.rows, "offset": self.offset, "ino": self.ino}

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
            data = fh.read()
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
        names = [tag_key(name, self.aliases) for name in next(csv.reader([header]))]
        out: list[dict[str, Any]] = []
        for row in csv.reader(lines):
            self.rows += 1
            values: dict[str, float] = {}
            step: int | None = None
            for name, cell in zip(names, row, strict=False):
                if not cell:
                    continue
                try:
                    value = float(cell)
                except ValueError:
                    continue  # a text column: nothing to monitor
                if name == "step":
                    step = int(value) if value.is_integer() and value >= 0 else None
                else:
                    values[name] = value
            if step is not None and values:
                out.extend(split_step(step, values))
        return out
