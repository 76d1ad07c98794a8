"""Never blind in silence: say which series are watched, and say it loudly when none
is a loss.

``Watching series`` (info) once the first records are in (at the end of a replay, when
every series is known), each role's series and the ones ignored; live, again when a role
gets its first series or another main one (a Keras run's validation folder writes its
first scalars an epoch after the train folder). ``No loss series
(warning) once records have come in for ``NO_LOSS_AFTER`` seconds (or at the end of a
replay) without any loss series, naming what was seen and the alias that would fix it;
repeated at most hourly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smart_monitor.series import SeriesBook

__all__ = ["NO_LOSS_AFTER", "NO_LOSS_EVERY", "SeriesWatch"]

NO_LOSS_AFTER = 60.0  # seconds of records without a loss series before the warning
NO_LOSS_EVERY = 3600.0  # the warning again at most this often


class SeriesWatch:
    def __init__(self, book: SeriesBook, log: Any, clock: Callable[[], float]) -> None:
        self.book = book
        self.log = log
        self.clock = clock
        self.said = False
        self._keys = 0  # len(book.last) when the roles were last looked at
        self._gist: dict[str, tuple[str, ...]] = {}  # what the last line said, in short
        self.first_at: float | None = None  # clock() of the first record
        self.warned_at: float | None = None
        self.blind = False  # a No loss series warning was given
        self.defer = False  # replay: everything is said at the end, every series known

    def after(self, records: bool = False) -> None:
        """After a batch of records (``records``: the ingest's call) or a turn: the
        ``Watching series`` lines, the warning when due. A series noted aside (Keras's
        iteration-axis copies) before any record is no start."""
        if not self.book.last or self.defer or (self.first_at is None and not records):
            return
        now = self.clock()
        if self.first_at is None:
            self.first_at = now
        if len(self.book.last) != self._keys:  # a series never seen before
            self._keys = len(self.book.last)
            fields = self.book.watching()
            gist = _gist(fields)
            if not self.said or gist != self._gist:
                self.said, self._gist = True, gist
                self.log.info("Watching series", **fields)
        if now - self.first_at >= NO_LOSS_AFTER:
            self.check(now)

    def check(self, now: float | None = None) -> None:
        """Warn when no loss series was seen (at most every ``NO_LOSS_EVERY`` s)."""
        if self.book.has_loss:
            return
        now = self.clock() if now is None else now
        if self.warned_at is not None and now - self.warned_at < NO_LOSS_EVERY:
            return
        self.warned_at = now
        self.blind = True
        seen, fix = self.book.hint()
        self.log.warning(
            "No loss series", seen=",".join(seen[:40]) or "nothing", fix=fix,
            help="name the loss with [records] aliases or [records] loss",
        )

    def finish(self) -> None:
        """At the end of a replay: the line and the warning, whatever the clock says."""
        if not self.said and self.book.last:
            self.said = True
            self.log.info("Watching series", **self.book.watching())
        if not self.blind:
            self.warned_at = None
            self.check()


def _gist(fields: dict[str, str]) -> dict[str, tuple[str, ...]]:
    """Each watched role and its main series: a new series in a role that has its main
    one, or one more ignored, is no news."""
    return {
        label: tuple(n for n in names.split(",") if n.endswith("(main)"))
        for label, names in fields.items() if label != "ignored"
    }  # fmt: skip
