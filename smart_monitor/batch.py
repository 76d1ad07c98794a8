"""Runs of plain train records as columns, so a long replay pays numpy, not Python, for
the records that cannot fire.

The pipeline stays the judge: a detector's ``screen`` only says, conservatively, which
record of a block is the first one that *might* fire; every record before it is known
to be quiet and is absorbed in bulk, and that record itself goes through the ordinary
``update``. A false candidate costs one scalar update; a missed one would be a bug,
which ``tests/test_batch.py`` looks for by comparing against record-by-record runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from operator import itemgetter
from typing import Any

import numpy as np
import numpy.typing as npt

from smart_monitor.records import MAX_METRIC, MAX_STEP, NON_TRAIN_KEYS, TrainRecord

__all__ = [
    "Floats", "Row", "TrainBlock", "blocking_keys", "blocks", "rolling_mean", "rolling_mean_std",
    "rolling_median", "train_row", "train_rows", "window_medians",
]  # fmt: skip

# step, loss, learning_rate, grad_norm, the record, and which of the three are absent
Row = tuple[int, float | None, float | None, float | None, Mapping[str, Any], int]
Floats = npt.NDArray[np.float64]
_INF = float("inf")



def blocking_keys(aliases: Mapping[str, str]) -> frozenset[str]:
    """Keys that take a line off the bulk path: another record kind, or an alias."""
    return NON_TRAIN_KEYS | frozenset(aliases)


def train_rows(values: list[Any], blocking: frozenset[str]) -> list[Row | None]:
    """``train_row`` of each value. When the first holds step, loss, learning_rate and
    grad_norm (HF's shape), each record's four are taken in one C call; another shape
    goes record by record (for it, a missing key would cost an exception a record).

    >>> [r and r[:4] for r in train_rows([{"step": 1, "loss": 0.5, "learning_rate": 0.1,
    ...     "grad_norm": 1.0}, {"step": 2, "loss": 0.4}, {"eval_loss": 1.0}], frozenset())]
    [(1, 0.5, 0.1, 1.0), (2, 0.4, None, None), None]
    """
    first = values[0] if values else None
    if type(first) is dict and first.keys() >= _HF_KEYS:
        return [_hf_row(d, blocking) for d in values]
    return [train_row(d, blocking) for d in values]


def _hf_row(data: Any, blocking: frozenset[str]) -> Row | None:
    try:
        step, loss, lr, grad = _HF(data)
    except (KeyError, TypeError):  # another shape, or not a mapping
        return train_row(data, blocking)
    if (type(step) is int and type(loss) is float and type(lr) is float and type(grad) is float
            and 0 <= step <= MAX_STEP and -MAX_METRIC <= loss <= MAX_METRIC
            and -_INF < lr < _INF and -_INF < grad < _INF
            and type(data) is dict and blocking.isdisjoint(data)):
        return (step, loss, lr, grad, data, 0)
    return train_row(data, blocking)


_HF = itemgetter("step", "loss", "learning_rate", "grad_norm")
_HF_KEYS = frozenset(("step", "loss", "learning_rate", "grad_norm"))


def train_row(data: Any, blocking: frozenset[str]) -> Row | None:
    """The row of a plain train record: a non-negative int step and finite numbers.
    None for anything else (another kind, an alias to apply, a bad or non-finite
    value, or a loss past ``MAX_METRIC``, read as infinite): the record-by-record path
    handles those, with its logging. Written for speed: it runs once per line of a
    replay.

    >>> train_row({"step": 3, "loss": 0.5, "grad_norm": 1}, frozenset())[:4]
    (3, 0.5, None, 1.0)
    >>> train_row({"step": 3, "loss": float("nan")}, frozenset()) is None
    True
    >>> train_row({"step": 3, "loss": -1e308}, frozenset()) is None
    True
    """
    if type(data) is not dict:
        return None
    get = data.get
    step = get("step")
    if type(step) is not int or not 0 <= step <= MAX_STEP or not blocking.isdisjoint(data):
        return None
    loss, lr, grad = get("loss"), get("learning_rate"), get("grad_norm")
    if (type(loss) is float and type(lr) is float and type(grad) is float
            and -MAX_METRIC <= loss <= MAX_METRIC and -_INF < lr < _INF and -_INF < grad < _INF):
        return (step, loss, lr, grad, data, 0)  # the common case, in one test
    if loss is not None and (type(loss) is not float or not -MAX_METRIC <= loss <= MAX_METRIC):
        if type(loss) is not int or not -MAX_METRIC <= loss <= MAX_METRIC:
            return None  # a string, a bool, NaN, infinity or past MAX_METRIC
        loss = float(loss)
    if lr is not None and (type(lr) is not float or lr - lr != 0.0):
        if type(lr) is not int:
            return None
        lr = float(lr)
    if grad is not None and (type(grad) is not float or grad - grad != 0.0):
        if type(grad) is not int:
            return None
        grad = float(grad)
    if loss is None:
        if lr is None and grad is None:
            return None
        shape = (lr is None) << 1 | (grad is None) << 2 | 1
    else:
        shape = (lr is None) << 1 | (grad is None) << 2
    return (step, loss, lr, grad, data, shape)


@dataclass(slots=True)
class TrainBlock:
    """Train records with increasing steps; each of loss, learning_rate and grad_norm is
    in every record or in none. The loss and the learning rate are also columns (None
    when absent), for the screens; no screen needs the grad norm, which only fires when
    it is not finite, and such a record is never in a block."""

    rows: list[Row]
    steps: npt.NDArray[np.int64] = field(default_factory=lambda: np.empty(0, np.int64))
    loss: Floats | None = None
    learning_rate: Floats | None = None
    keys: set[str] = field(default_factory=set)  # every key of every row's record

    def __post_init__(self) -> None:
        """The columns ``blocks`` did not give (a block made by hand, in tests)."""
        first = self.rows[0]
        if not self.keys:
            self.keys = set().union(*map(_RAW, self.rows))  # in C
        if len(self.steps) != len(self.rows):
            self.steps = np.array([r[0] for r in self.rows], np.int64)
        if self.loss is None and first[1] is not None:
            self.loss = np.array([r[1] for r in self.rows], np.float64)
        if self.learning_rate is None and first[2] is not None:
            self.learning_rate = np.array([r[2] for r in self.rows], np.float64)

    def __len__(self) -> int:
        return len(self.rows)

    def record(self, i: int) -> TrainRecord:
        step, loss, lr, grad, raw, _ = self.rows[i]
        return TrainRecord(step, loss, lr, grad, raw)

    def tail(
        self, column: Floats, start: int, end: int, size: int
    ) -> tuple[list[int], list[float]]:
        """Steps and values of the last ``size`` records of ``[start, end)``: all that a
        window of ``size`` keeps of them."""
        first = max(start, end - size)
        return [r[0] for r in self.rows[first:end]], column[first:end].tolist()


def blocks(rows: list[Row]) -> list[tuple[int, TrainBlock]]:
    """Split rows where steps stop increasing or the set of fields present changes;
    each block with the index of its first row."""
    if not rows:
        return []
    n = len(rows)
    steps = np.fromiter(map(_STEP, rows), np.int64, n)
    shapes = np.fromiter(map(_SHAPE, rows), np.int8, n)
    # a column for every row at once (an absent value is NaN), sliced per block; a
    # block's column is None where its rows lack the value (the same in every row)
    absent = int(np.bitwise_or.reduce(shapes))
    loss, lr = (
        np.fromiter(map(get, rows), np.float64, n) if not absent & bit  # no None: in C
        else np.array(list(map(get, rows)), np.float64)
        for get, bit in ((_LOSS, 1), (_LR, 2))
    )
    cuts = np.flatnonzero((steps[1:] <= steps[:-1]) | (shapes[1:] != shapes[:-1])) + 1
    edges = [0, *cuts.tolist(), n]
    return [
        (a, TrainBlock(rows[a:b], steps[a:b], None if rows[a][1] is None else loss[a:b],
                       None if rows[a][2] is None else lr[a:b]))
        for a, b in pairwise(edges)
    ]  # fmt: skip


_STEP, _LOSS, _LR, _RAW, _SHAPE = (itemgetter(i) for i in (0, 1, 2, 4, 5))


def rolling_mean(history: list[float], values: Floats, size: int) -> Floats:
    """For each ``values[j]``, the mean of the ``size`` values before it, ``history``
    (the window as it stands) continuing into ``values``."""
    return rolling_mean_std(history, values, size)[0]


def rolling_mean_std(history: list[float], values: Floats, size: int) -> tuple[Floats, Floats]:
    """Mean and population std of the window before each value, from cumulative sums
    of the values less a reference (which keeps the variance's cancellation small).
    Accurate to far better than the slack the screens leave; not bit-identical to the
    rolling Welford sums, which is why ``update`` makes every decision."""
    joined = np.concatenate([np.asarray(history, np.float64), values])
    ref = joined[0] if len(joined) else 0.0
    centred = joined - ref
    sums = np.concatenate([[0.0], np.cumsum(centred)])
    squares = np.concatenate([[0.0], np.cumsum(centred * centred)])
    end = np.arange(len(history), len(joined))  # values[j] sits at joined[end[j]]
    begin = np.maximum(end - size, 0)
    count = np.maximum(end - begin, 1)
    mean = (sums[end] - sums[begin]) / count
    var = (squares[end] - squares[begin]) / count - mean * mean
    return mean + ref, np.sqrt(np.maximum(var, 0.0))


def rolling_median(history: list[float], values: Floats, size: int, include: bool) -> Floats:
    """For each ``values[j]``, the median of the window before it (``include``: the
    window after adding it). The window is full: ``len(history) == size``."""
    joined = np.concatenate([np.asarray(history, np.float64), values])
    first = 1 if include else 0
    return window_medians(joined, size, slice(first, first + len(values)))


def window_medians(joined: Floats, size: int, which: slice | npt.NDArray[np.intp]) -> Floats:
    """The medians of the windows ``joined[i : i + size]`` for the ``i`` in ``which``."""
    windows = np.lib.stride_tricks.sliding_window_view(joined, size)
    # sorting small rows beats np.median's partition here, and takes the middle the
    # same way as RollingMedian.median, to the bit
    ordered = np.sort(windows[which], axis=1)
    mid = size // 2
    if size % 2:
        return ordered[:, mid]
    return (ordered[:, mid - 1] + ordered[:, mid]) / 2
