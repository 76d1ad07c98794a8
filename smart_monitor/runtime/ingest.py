"""Lines and decoded entries to records, for ``run`` and ``replay`` alike: both hand
blocks of lines to ``handle_lines`` (the daemon a block is what one read returned,
often one line), so what a replay shows is what ``run`` does, by construction.

The plain train records of a block take the pipeline's bulk path; every other line (an
eval, an example, a blank or bad line) goes through ``handle_line`` in its turn among
them. Malformed lines are counted and logged, the first hundred and then one in a
thousand: a trainer printing garbage must not fill the disk with our log."""

from __future__ import annotations

import gc
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from operator import itemgetter
from typing import Any, cast

import orjson

from smart_monitor.batch import Row, blocking_keys, blocks, train_row, train_rows
from smart_monitor.pipeline import Outcome, Pipeline
from smart_monitor.records import MalformedLine, Record, parse_line, to_record
from smart_monitor.runtime.watching import SeriesWatch
from smart_monitor.series import SeriesBook
from smart_monitor.sources.steps import WRITER_STARTED

__all__ = ["Ingest", "no_cyclic_gc"]

_MALFORMED_LOG_FIRST = 100  # then one line in every _MALFORMED_LOG_EVERY
_MALFORMED_LOG_EVERY = 1000

_RAW = itemgetter(4)  # a batch.Row's record
_Between = list[tuple[int, Callable[[], None]]]  # (k, handle): run before train row k


class Ingest:
    def __init__(
        self,
        pipeline: Pipeline,
        act: Callable[[Outcome], None],
        log: Any,
        aliases: Mapping[str, str],
        max_line_bytes: int,
        counts: Counter[str],
        clock: Callable[[], float] = time.monotonic,
        series: SeriesBook | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.act = act
        self.log = log
        self.aliases = aliases
        self.blocking = blocking_keys(aliases)
        self.max_line_bytes = max_line_bytes
        self.counts = counts
        self.clock = clock
        self.last_record_at: float | None = None  # clock() of the last record (metrics)
        self.series = SeriesBook(aliases) if series is None else series
        self.watch = SeriesWatch(self.series, log, clock)

    def handle_lines(self, lines: list[bytes | None], offset: int) -> None:
        """Consecutive lines from byte ``offset`` on, as ``LineSplitter`` blocks them
        (``None``: a line over ``max_line_bytes``). The loop is the hot path of both
        commands: it does no more per line than it must."""
        parsed = _loads_all(lines)
        found = train_rows(parsed, self.blocking)
        others = _indexes_of_none(found)
        rows: list[Row] = list(filter(None, found)) if others else cast(list[Row], found)
        between: _Between = []
        for before, i in enumerate(others):
            line = lines[i]
            k = i - before  # the train rows ahead of it
            at = partial(_offset_of, lines, offset, i)  # counted only for a malformed line
            if line is None:
                between.append((k, partial(self._oversized, at)))
            elif line:
                between.append((k, partial(self._handle_line, line, at)))
        self._handle_rows(rows, between, note=True)
        self.watch.after(records=True)

    def _oversized(self, offset: Callable[[], int]) -> None:
        self.malformed("oversized", f"line over {self.max_line_bytes} bytes", offset())

    def handle_line(self, line: bytes, offset: int | None = None) -> None:
        """One line the bulk path left: another kind of record, or a bad line."""
        self._handle_line(line, lambda: offset)

    def _handle_line(self, line: bytes, offset: Callable[[], int | None]) -> None:
        try:
            record = parse_line(line, self.aliases, self.series.is_main)
        except MalformedLine as exc:
            self.malformed(exc.reason, exc.detail, offset())
            return
        if record is not None:
            self.series.observe(record.raw)
            self._record(record)

    def handle_entries(self, entries: Iterable[Mapping[str, Any]]) -> None:
        """Already-decoded entries (a ``trainer_state.json`` log_history, a TensorBoard
        or CSV source), like ``handle_lines``."""
        rows: list[Row] = []
        between: _Between = []
        note = self.series.last.update
        noted = False
        for entry in entries:
            if WRITER_STARTED in entry:
                between.append((len(rows), self.pipeline.writer_started))
                continue
            noted = True
            if entry.get("loss", 0) is None or entry.get("eval_loss", 0) is None:
                # a row without the main loss (split_step): its last value stands
                note({k: v for k, v in entry.items() if v is not None})
            else:
                note(entry)
            row = train_row(entry, self.blocking)
            if row is not None:
                rows.append(row)
            else:
                between.append((len(rows), partial(self._handle_entry, entry)))
        self._handle_rows(rows, between)
        self.watch.after(records=noted)  # a new file's mark alone is no record

    def _handle_entry(self, entry: Mapping[str, Any]) -> None:
        try:
            record = to_record(entry, self.aliases, self.series.is_main)
        except MalformedLine as exc:
            self.malformed(exc.reason, exc.detail, None)
            return
        if record is not None:
            self._record(record)

    def _handle_rows(self, rows: list[Row], between: _Between, note: bool = False) -> None:
        """``rows`` block by block, each with the other records (``between``: before
        row k) that fall among its rows; those after the last row at the end.
        ``note``: first take every series' last value from the rows (the other lines:
        ``handle_line``)."""
        self.counts["records"] += len(rows)
        if rows:
            self.last_record_at = self.clock()
        pending = deque(between)
        built = blocks(rows)
        for _, block in built if note else ():
            last = block.rows[-1][4]
            if len(last) == len(block.keys):  # the last row holds every key's last value
                self.series.last.update(last)
            else:  # in C: a loop of its own
                deque(map(self.series.last.update, map(_RAW, block.rows)), maxlen=0)
        for start, block in built:
            end = start + len(block)
            mine = []
            while pending and pending[0][0] < end:
                k, handle = pending.popleft()
                mine.append((k - start, handle))
            self.pipeline.process_block(block, self.act, mine)
        for _, handle in pending:
            handle()

    def _record(self, record: Record) -> None:
        self.counts["records"] += 1
        self.last_record_at = self.clock()
        outcome = self.pipeline.process(record)
        if outcome is not None:
            self.act(outcome)

    def malformed(self, reason: str, detail: str, offset: int | None) -> None:
        n = self.counts["malformed"] = self.counts["malformed"] + 1
        if n <= _MALFORMED_LOG_FIRST or n % _MALFORMED_LOG_EVERY == 0:
            self.log.warning(
                "Skipped malformed line",
                reason=reason, detail=detail or None, offset=offset, count=n,
            )

    def skipped_nuls(self, count: int, offset: int) -> None:
        """A NUL run the line reader skipped (FAULTS.md #7), for a replay's log; the
        daemon logs the tailer's own event."""
        self.counts["nul_bytes_skipped"] += count
        self.log.warning("Skipped NUL bytes", count=count, offset=offset)


@contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while records stream through. Each line
    makes a dict and a tuple, none in a reference cycle (reference counting frees them
    all); the collector would only scan them over and over: 20 % of a replay here."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _loads_all(lines: list[bytes | None]) -> list[Any]:
    """Each line's value; None for a blank, bad, NaN or oversized (None) line.

    While every line parses, which is nearly always, the block is parsed as one JSON
    array: a third faster than a call per line. Each line gives at least one element
    and a raw newline cannot stand inside a JSON string, so with a newline in every
    separator no value runs from one line into the next through a string; as many
    elements as lines then means one for each: a torn line makes the array invalid, and
    only lines written to join into one value where another splits into two could pass
    (each of them malformed on its own). Otherwise the lines are parsed one by one."""
    try:
        parsed: list[Any] = orjson.loads(b"[" + b"\n,".join(lines) + b"]")  # type: ignore[arg-type]
        if len(parsed) == len(lines):
            return parsed
    except (orjson.JSONDecodeError, TypeError):  # None in ``lines`` raises TypeError
        pass
    try:
        return list(map(orjson.loads, lines))  # type: ignore[arg-type]  # None: below
    except (orjson.JSONDecodeError, TypeError):
        return [_loads_or_none(line) for line in lines]


def _loads_or_none(line: bytes | None) -> Any:
    try:
        return orjson.loads(line)  # type: ignore[arg-type]  # None raises TypeError: caught
    except (orjson.JSONDecodeError, TypeError):
        return None


def _offset_of(lines: list[bytes | None], offset: int, i: int) -> int:
    """The offset of ``lines[i]``, the block starting at ``offset``. A None (a line over
    the limit) only ends a block, so every line before one has a length."""
    return offset + sum(map(len, lines[:i])) + i  # type: ignore[arg-type]  # see above


def _indexes_of_none(items: list[Any]) -> list[int]:
    """Where ``None`` stands in ``items``: ``list.index`` scans in C, and there are
    few (an eval or example record among hundreds of train records)."""
    found: list[int] = []
    i = -1
    try:
        while True:
            i = items.index(None, i + 1)
            found.append(i)
    except ValueError:
        return found
