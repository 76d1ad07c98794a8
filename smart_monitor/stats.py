"""Tiny running statistics shared by every detector.

Each keeps the ``(step, value)`` pairs of its window so that a trainer restart can drop
the points past the checkpoint it resumed from (``rewind``), and serialises to plain
JSON values (``state_dict``).
"""

from __future__ import annotations

import math
from bisect import bisect_left, insort
from collections import deque
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

__all__ = [
    "DIFF_SIGMA", "MAD_SIGMA", "BlipHistory", "Ewma", "Relearn", "RollingMedian", "RollingWindow",
]

MAD_SIGMA = 1.4826  # MAD times this is the standard deviation of a normal sample
# The difference of two independent N(0, s^2) values is N(0, 2 s^2), so the median
# absolute difference of successive values is 0.6745 * sqrt(2) * s = 0.954 s: divided by
# 0.954, it is the noise's standard deviation.
DIFF_SIGMA = 1.0 / (0.6745 * 2.0**0.5)


class RollingWindow:
    """Mean and standard deviation of the last ``size`` values (rolling Welford).

    >>> w = RollingWindow(8)
    >>> for i, v in enumerate([0.72, 0.71, 0.73, 0.70, 0.72, 0.71, 0.73, 0.72]):
    ...     w.add(i, v)
    >>> round(w.mean, 4), round(w.std, 5)
    (0.7175, 0.00968)
    """

    __slots__ = ("_items", "_since", "m2", "mean", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: deque[tuple[int, float]] = deque()
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean
        self._since = 0  # replacements since the sums were last recomputed exactly

    def __len__(self) -> int:
        return len(self._items)

    @property
    def var(self) -> float:
        """Population variance."""
        n = len(self._items)
        return max(self.m2, 0.0) / n if n else 0.0

    @property
    def std(self) -> float:
        """Population standard deviation (the z-score's denominator in DESIGN.md)."""
        return math.sqrt(self.var)

    def add(self, step: int, value: float) -> None:
        items = self._items
        n = len(items)
        items.append((step, value))
        if n < self.size:
            n += 1
            delta = value - self.mean
            self.mean += delta / n
            self.m2 += delta * (value - self.mean)
            return
        # full: replace the oldest value in one update (the replay hot path)
        old = items.popleft()[1]
        mean = self.mean
        self.mean = new = mean + (value - old) / n
        self.m2 += (value - old) * (value - new + old - mean)
        self._since += 1
        if self._since >= 64 * n:  # rounding drifts over millions of updates: re-sum
            self._reset(list(items))

    def values(self) -> list[float]:
        return [v for _, v in self._items]

    def extend(self, steps: list[int], values: list[float]) -> None:
        """``add`` each pair; a run longer than the window replaces it in one pass."""
        if len(values) < self.size:
            for s, v in zip(steps, values, strict=True):
                self.add(s, v)
        else:
            self._reset(list(zip(steps[-self.size :], values[-self.size :], strict=True)))

    def rewind(self, step: int) -> None:
        """Forget every point logged after ``step``."""
        kept = [(s, v) for s, v in self._items if s <= step]
        if len(kept) != len(self._items):
            self._reset(kept)

    def _reset(self, items: list[tuple[int, float]]) -> None:
        """Exact two-pass sums over ``items``."""
        self._items.clear()
        self._items.extend(items)
        self._since = 0
        n = len(items)
        self.mean = sum(v for _, v in items) / n if n else 0.0
        self.m2 = sum((v - self.mean) ** 2 for _, v in items)

    def state_dict(self) -> dict[str, Any]:
        return {"items": [list(p) for p in self._items]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset([(int(s), float(v)) for s, v in state.get("items", [])][-self.size :])


class RollingMedian:
    """Median and MAD of the last ``size`` values: a baseline that outliers cannot drag.

    >>> m = RollingMedian(5)
    >>> for i, v in enumerate([1.0, 1.1, 0.9, 50.0, 1.0]):
    ...     m.add(i, v)
    >>> m.median, round(m.mad, 3)
    (1.0, 0.1)
    """

    __slots__ = ("_items", "_sorted", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: deque[tuple[int, float]] = deque()
        self._sorted: list[float] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, step: int, value: float) -> None:
        items, ordered = self._items, self._sorted
        if len(items) == self.size:
            del ordered[bisect_left(ordered, items.popleft()[1])]
        items.append((step, value))
        insort(ordered, value)

    @property
    def median(self) -> float:
        ordered = self._sorted
        n = len(ordered)
        if n % 2:
            return ordered[n // 2]
        return (ordered[n // 2 - 1] + ordered[n // 2]) / 2 if n else math.nan

    @property
    def mad(self) -> float:
        """Median absolute deviation (unscaled)."""
        if not self._sorted:
            return 0.0
        med = self.median
        return _median(sorted(abs(v - med) for v in self._sorted))

    @property
    def span(self) -> tuple[float, float]:
        """The lowest and the highest value in the window (NaN, NaN when empty)."""
        ordered = self._sorted
        return (ordered[0], ordered[-1]) if ordered else (math.nan, math.nan)

    def values(self) -> list[float]:
        return [v for _, v in self._items]

    def extend(self, steps: list[int], values: list[float]) -> None:
        """``add`` each pair; a run longer than the window replaces it in one pass."""
        if len(values) < self.size:
            for s, v in zip(steps, values, strict=True):
                self.add(s, v)
            return
        items = list(zip(steps[-self.size :], values[-self.size :], strict=True))
        self._items.clear()
        self._items.extend(items)
        self._sorted = sorted(values[-self.size :])

    def rewind(self, step: int) -> None:
        kept = [(s, v) for s, v in self._items if s <= step]
        if len(kept) != len(self._items):
            self._reset(kept)

    def _reset(self, items: list[tuple[int, float]]) -> None:
        self._items.clear()
        self._sorted.clear()
        for s, v in items:
            self.add(s, v)

    def state_dict(self) -> dict[str, Any]:
        return {"items": [list(p) for p in self._items]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reset([(int(s), float(v)) for s, v in state.get("items", [])][-self.size :])


class _Baseline(Protocol):
    def add(self, step: int, value: float) -> None: ...


class Relearn:
    """Values that fired in a row, kept out of their detector's baseline (a spike must
    not hide the next one) until ``relearn`` of them say the level moved: then they all
    join it, a new level rather than an outlier.

    >>> base, streak = RollingMedian(10), Relearn(3)
    >>> [streak.fire(s, 5.0, base) for s in (1, 2, 3)], len(base), len(streak)
    ([1, 2, 3], 3, 0)
    """

    __slots__ = ("items", "relearn")

    def __init__(self, relearn: int) -> None:
        self.relearn = relearn
        self.items: list[tuple[int, float]] = []

    def __len__(self) -> int:
        return len(self.items)

    def clear(self) -> None:
        """A quiet value: the streak is over."""
        self.items.clear()

    def fire(self, step: int, value: float, baseline: _Baseline) -> int:
        """A value that fired; its place in the streak (1: the first). The ``relearn``-th
        hands the whole streak to ``baseline`` and starts a new one."""
        self.items.append((step, value))
        n = len(self.items)
        if n >= self.relearn:
            for s, v in self.items:
                baseline.add(s, v)
            self.items.clear()
        return n

    def rewind(self, step: int) -> None:
        self.items = [p for p in self.items if p[0] <= step]

    def state_dict(self) -> list[list[float]]:
        return [list(p) for p in self.items]

    def load_state_dict(self, state: list[Any]) -> None:
        self.items = [(int(s), float(v)) for s, v in state]


class Ewma:
    """An exponentially weighted mean: a level that follows a trend and forgets noise.

    >>> e = Ewma(0.5)
    >>> [e.add(v) for v in (1.0, 3.0, 3.0)]
    [1.0, 2.0, 2.5]
    >>> e.value
    2.5
    """

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float, value: float | None = None) -> None:
        self.alpha = alpha
        self.value = value

    def add(self, value: float) -> float:
        """Take in ``value``; the new level (the first value is the level itself)."""
        old = self.value
        self.value = new = value if old is None else self.alpha * value + (1 - self.alpha) * old
        return new

    def extend(self, values: npt.NDArray[np.float64]) -> None:
        """Take in every value at once (the bulk path): the level ``add`` would reach,
        in closed form, to rounding.

        >>> a, b = Ewma(0.2), Ewma(0.2)
        >>> _ = [a.add(v) for v in (1.0, 3.0, 2.0, 5.0)]
        >>> b.extend(np.array([1.0, 3.0, 2.0, 5.0]))
        >>> round(a.value, 12) == round(b.value, 12)
        True
        """
        if not len(values):
            return
        if self.value is None:
            self.value, values = float(values[0]), values[1:]
        keep = 1.0 - self.alpha
        weights = self.alpha * keep ** np.arange(len(values) - 1, -1, -1, dtype=np.float64)
        self.value = float(keep ** len(values) * self.value + weights @ values)

    def levels(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Take in every value at once, as ``extend``; the level after each one (what
        each ``add`` would return, to rounding), ``_LEVELS_CHUNK`` values at a time: one
        small weight matrix, kept for good, serves any length.

        >>> a, b = Ewma(0.2), Ewma(0.2)
        >>> want = [a.add(v) for v in (1.0, 3.0, 2.0, 5.0)]
        >>> [round(x, 12) for x in b.levels(np.array([1.0, 3.0, 2.0, 5.0]))] == [
        ...     round(x, 12) for x in want]
        True
        """
        n = len(values)
        if not n:
            return np.empty(0, np.float64)
        if self.value is None:  # the first value is the level itself
            self.value = float(values[0])
            return np.concatenate([values[:1], self.levels(values[1:])])
        decay, weights = _ewma_weights(self.alpha, _LEVELS_CHUNK)
        out = np.empty(n, np.float64)
        level = self.value
        for a in range(0, n, _LEVELS_CHUNK):
            m = min(_LEVELS_CHUNK, n - a)
            out[a : a + m] = decay[:m] * level + weights[:m, :m] @ values[a : a + m]
            level = float(out[a + m - 1])
        self.value = level
        return out


_LEVELS_CHUNK = 64  # values per matrix product in ``Ewma.levels`` (a 32 KiB matrix)


@lru_cache(maxsize=8)
def _ewma_weights(alpha: float, n: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """For ``n`` values: the decay of the start level in each level, and the weight of
    each value in each level (row k, column j: ``alpha * (1 - alpha) ** (k - j)``)."""
    keep = 1.0 - alpha
    lag = np.subtract.outer(np.arange(n), np.arange(n))
    weights = np.where(lag >= 0, alpha * keep ** np.maximum(lag, 0), 0.0)
    return keep ** np.arange(1, n + 1, dtype=np.float64), weights


class BlipHistory:
    """The one-step blips a run has produced (their size as a ratio to the baseline, at
    their step), so that a new one can be judged against the run's own texture: how
    many earlier blips were at least as large, and so how often such a blip comes
    (its return period in steps). Keeps the ``size`` largest, which is all a count of
    "at least as large" of a large blip needs.

    >>> h = BlipHistory()
    >>> h.start(0)
    >>> for step, ratio in ((300, 1.7), (900, 1.8), (1200, 1.2)):
    ...     h.add(step, ratio)
    >>> h.judge(1500, 1.7)
    (2, 750.0)
    >>> h.judge(1500, 2.5)
    (0, None)
    """

    __slots__ = ("_items", "since", "size")

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self.since: int | None = None  # the run's first step
        self._items: list[tuple[int, float]] = []

    def start(self, step: int) -> None:
        if self.since is None:
            self.since = step

    def judge(self, step: int, ratio: float) -> tuple[int, float | None]:
        """Earlier blips at least ``ratio`` and their return period (None: never)."""
        count = sum(1 for _, r in self._items if r >= ratio)
        if not count:
            return 0, None
        return count, (step - (self.since if self.since is not None else step)) / count

    def add(self, step: int, ratio: float) -> None:
        self._items.append((step, ratio))
        if len(self._items) > self.size:
            self._items.remove(min(self._items, key=lambda p: p[1]))

    def rewind(self, step: int) -> None:
        self._items = [p for p in self._items if p[0] <= step]
        if self.since is not None and self.since > step:
            self.since = None

    def state_dict(self) -> dict[str, Any]:
        return {"since": self.since, "items": [list(p) for p in self._items]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        since = state.get("since")
        self.since = None if since is None else int(since)
        self._items = [(int(s), float(r)) for s, r in state.get("items", [])][-self.size :]


def _median(ordered: list[float]) -> float:
    n = len(ordered)
    if n == 0:
        return math.nan
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
