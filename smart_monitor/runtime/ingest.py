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

from smart_monitor.batch import Row, blocking_keys, blocks, train_row
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
        try:  # one C-level loop while every line parses, which is nearly always
            parsed: list[Any] = list(map(orjson.loads, lines))  # type: ignore[arg-type]  # None: below
        except (orjson.JSONDecodeError, TypeError):  # a blank, bad, NaN or oversized line
            parsed = [_loads_or_none(line) for line in lines]
        blocking = self.blocking
        found = [train_row(d, blocking) for d in parsed]
        others = _indexes_of_none(found)
        rows: list[Row] = list(filter(None, found)) if others else cast(list[Row], found)
        # every series' last value (the other lines: handle_line), in C: a loop of its own
        deque(map(self.series.last.update, map(_RAW, rows)), maxlen=0)
        between: _Between = []
        done = 0  # lines whose length is in ``offset``
        for before, i in enumerate(others):
            line = lines[i]
            offset += sum(map(len, lines[done:i])) + i - done  # type: ignore[arg-type]  # see:
            # a None only ends a block, so every line before this one has a length
            done = i
            k = i - before  # the train rows ahead of it
            if line is None:
                report = partial(
                    self.malformed, "oversized", f"line over {self.max_line_bytes} bytes", offset
                )
                between.append((k, report))
            elif line:
                between.append((k, partial(self.handle_line, line, offset)))
        self._handle_rows(rows, between)
        self.watch.after(records=True)

    def handle_line(self, line: bytes, offset: int | None = None) -> None:
        """One line the bulk path left: another kind of record, or a bad line."""
        try:
            record = parse_line(line, self.aliases, self.series.is_main)
        except MalformedLine as exc:
            self.malformed(exc.reason, exc.detail, offset)
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

    def _handle_rows(self, rows: list[Row], between: _Between) -> None:
        """``rows`` block by block, each with the other records (``between``: before
        row k) that fall among its rows; those after the last row at the end."""
        self.counts["records"] += len(rows)
        if rows:
            self.last_record_at = self.clock()
        pending = deque(between)
        for start, block in blocks(rows):
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


def _loads_or_none(line: bytes | None) -> Any:
    try:
        return orjson.loads(line)  # type: ignore[arg-type]  # None raises TypeError: caught
    except (orjson.JSONDecodeError, TypeError):
        return None


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
