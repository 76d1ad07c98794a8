"""Prediction examples: confident mistakes, costly right answers, and the inverted
pattern where right answers cost more than wrong ones."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from smart_monitor.config import PredictionsConfig
from smart_monitor.detectors.base import NotesTrainSteps, isfinite
from smart_monitor.notes import Note
from smart_monitor.records import Record
from smart_monitor.triggers import Severity, Trigger

__all__ = ["InvertedLossPattern", "PredictionOutliers", "mann_whitney_p"]


class PredictionOutliers(NotesTrainSteps):
    """A right answer with a high loss, or a wrong answer with a low loss.

    >>> from smart_monitor.records import ExampleRecord
    >>> d = PredictionOutliers(PredictionsConfig())
    >>> d.update(ExampleRecord(7, "q", "a", "a", True, 2.34, {}))[0].name
    'perfect_answer_high_loss_2.34'
    >>> d.update(ExampleRecord(7, "q", "a", "b", False, 0.05, {}))[0].name
    'wrong_answer_low_loss_0.05'
    """

    def __init__(self, config: PredictionsConfig) -> None:
        self.config = config
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.last_z: float | None = None  # no z-score
        self.last_step = 0

    def update(self, record: Record) -> list[Trigger]:
        found = self.example(record)
        if found is None or not isfinite(found[0].loss):
            return []
        record, step = found
        loss = float(record.loss)  # type: ignore[arg-type]
        details = {
            "loss": loss,
            "prompt": record.prompt,
            "golden_answer": record.golden_answer,
            "model_answer": record.model_answer,
        }
        if record.matches and loss > self.config.high_loss:
            kind = "perfect_answer_high_loss"
        elif not record.matches and loss < self.config.low_loss:
            kind = "wrong_answer_low_loss"
        else:
            return []
        return [Trigger(kind, f"{kind}_{loss:.2f}", Severity.WARNING, step, details)]

    def rewind(self, step: int) -> None:
        self.last_step = min(self.last_step, step)

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_step = int(state.get("last_step", 0))


_RECENT_GROUPS = 4  # the latest evaluations tested on their own


class InvertedLossPattern(NotesTrainSteps):
    """Over the last ``inverted_window`` examples, right answers cost significantly more
    than wrong ones (one-sided Mann-Whitney U, p < ``inverted_alpha``, at least
    ``inverted_min_each`` of each): the model is confidently wrong. Fires when the
    pattern appears and again only after it has gone away.

    The examples of the latest evaluations are tested on their own too (those of the
    last 1, 2, ... ``_RECENT_GROUPS`` steps, ``inverted_alpha`` shared among the tests):
    when evaluations are far apart with few examples each, a window still half full of
    examples from before the change would hide it for many evaluations."""

    kind = "inverted_loss_pattern"

    def __init__(self, config: PredictionsConfig) -> None:
        self.config = config
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.last_z: float | None = None  # no z-score
        self.examples: deque[tuple[int, bool, float]] = deque(maxlen=config.inverted_window)
        self.active = False
        self.last_step = 0

    def update(self, record: Record) -> list[Trigger]:
        found = self.example(record)
        if found is None or not isfinite(found[0].loss):
            return []
        record, step = found
        self.examples.append((step, record.matches, float(record.loss)))  # type: ignore[arg-type]
        least = self.config.inverted_min_each
        tests = [t for t in self._suffixes() if min(len(t[0]), len(t[1])) >= least]
        if not tests:
            return []
        p, right, wrong = min((mann_whitney_p(r, w), r, w) for r, w in tests)
        if p * len(tests) >= self.config.inverted_alpha:
            self.active = False
            return []
        if self.active:
            return []
        self.active = True
        details = {
            "p_value": p,
            "correct_mean_loss": sum(right) / len(right),
            "wrong_mean_loss": sum(wrong) / len(wrong),
            "n_correct": len(right),
            "n_wrong": len(wrong),
        }
        name = f"{self.kind}_correct_high"
        return [Trigger(self.kind, name, Severity.CRITICAL, step, details)]

    def _suffixes(self) -> list[tuple[list[float], list[float]]]:
        """(right losses, wrong losses) of the examples of the last 1, 2, ... steps (up to
        ``_RECENT_GROUPS``) and of the whole window."""
        out: list[tuple[list[float], list[float]]] = []
        right: list[float] = []
        wrong: list[float] = []
        groups = 0
        last: int | None = None
        for step, ok, loss in reversed(self.examples):
            if step != last and last is not None:
                groups += 1
                if groups <= _RECENT_GROUPS:
                    out.append((list(right), list(wrong)))
            last = step
            (right if ok else wrong).append(loss)
        out.append((right, wrong))
        return out

    def rewind(self, step: int) -> None:
        kept = [e for e in self.examples if e[0] <= step]
        self.examples.clear()
        self.examples.extend(kept)
        self.last_step = min(self.last_step, step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "examples": [list(e) for e in self.examples],
            "active": self.active,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.examples.clear()
        self.examples.extend((int(s), bool(ok), float(v)) for s, ok, v in state.get("examples", []))
        self.active = bool(state.get("active", False))
        self.last_step = int(state.get("last_step", 0))


def mann_whitney_p(high: list[float], low: list[float]) -> float:
    """One-sided p-value that ``high`` tends to exceed ``low`` (normal approximation
    with tie correction; fine for the >= 20 per group this is used with).

    >>> round(mann_whitney_p([3.0, 4.0, 5.0, 6.0] * 5, [1.0, 2.0, 0.5, 1.5] * 5), 6)
    0.0
    """
    n1, n2 = len(high), len(low)
    ranked = sorted([(v, 0) for v in high] + [(v, 1) for v in low])
    ranks = [0.0] * len(ranked)
    tie_term = 0.0
    i = 0
    while i < len(ranked):
        j = i
        while j + 1 < len(ranked) and ranked[j + 1][0] == ranked[i][0]:
            j += 1
        for k in range(i, j + 1):
            ranks[k] = (i + j) / 2 + 1
        t = j - i + 1
        tie_term += t**3 - t
        i = j + 1
    r1 = sum(r for r, (_, g) in zip(ranks, ranked, strict=True) if g == 0)
    u = r1 - n1 * (n1 + 1) / 2
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
    if var <= 0:
        return 1.0
    z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))
