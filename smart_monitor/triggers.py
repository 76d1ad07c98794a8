"""What a detector returns: an immutable trigger with a contract name (DESIGN.md)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "CRITICAL_KINDS",
    "KINDS",
    "WEIGHTS_NONFINITE",
    "WEIGHT_NORM_ZSCORE",
    "Severity",
    "Trigger",
    "kind_of",
    "problem_of",
    "stats_label",
]


class Severity(str, Enum):  # noqa: UP042 (StrEnum would change how 3.11 formats it)
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.CRITICAL: 2}


@dataclass(frozen=True, slots=True)
class Trigger:
    """One detection. ``kind`` groups triggers for cooldowns and the stats table;
    ``name`` is the contract's name with its number (``loss_zscore_43.20``)."""

    kind: str
    name: str
    severity: Severity
    step: int
    details: Mapping[str, Any] = field(default_factory=dict)


# Trigger kinds whose name ends in a number; the stats table shows them as `kind_*`.
NUMBERED_KINDS = (
    "loss_zscore",
    "lr_zscore",
    "loss_spike",
    "best_model_loss",
    "accuracy_drop",
    "perfect_answer_high_loss",
    "wrong_answer_low_loss",
    "weight_norm_zscore",
)
# Fired by the optional checkpoint scan (forensics/scan.py) from a checkpoint's weights,
# not from a record; weights_nonfinite is left out of CRITICAL_KINDS so that a stats
# table of a run without the scan does not claim "0 (good!)" for something never checked.
WEIGHTS_NONFINITE = "weights_nonfinite"
WEIGHT_NORM_ZSCORE = "weight_norm_zscore"
# Shown in the stats table even at zero: any of these means a run worth a look.
CRITICAL_KINDS = (
    "loss_nonfinite",
    "grad_norm_nonfinite",
    "divergence_detected",
    "inverted_loss_pattern",
)
# Every kind a trigger can have: what ``on_triggers`` may name (a test keeps it in
# step with the detectors).
KINDS = frozenset(
    (*NUMBERED_KINDS, *CRITICAL_KINDS, WEIGHTS_NONFINITE, "conflicting_labels", "MULTIPLE_TRIGGERS")
)
_NUMBER_SUFFIX = re.compile(r"_-?[0-9][0-9.]*(pct)?$")


# Kinds that report one problem: their detections form one incident, one snapshot.
_PROBLEM = {
    "loss_zscore": "loss_spike",
    "loss_spike": "loss_spike",
    "loss_nonfinite": "nonfinite",
    "grad_norm_nonfinite": "nonfinite",
    "perfect_answer_high_loss": "prediction_outlier",
    "wrong_answer_low_loss": "prediction_outlier",
}


def problem_of(kind: str) -> str:
    """The problem a trigger kind reports (incidents group by it); itself by default.

    >>> problem_of("loss_zscore"), problem_of("lr_zscore")
    ('loss_spike', 'lr_zscore')
    """
    return _PROBLEM.get(kind, kind)


def kind_of(name: str) -> str:
    """The kind of a trigger name read back from a log line.

    >>> kind_of("loss_zscore_-3.21"), kind_of("inverted_loss_pattern_correct_high")
    ('loss_zscore', 'inverted_loss_pattern')
    """
    if name.startswith("inverted_loss_pattern"):
        return "inverted_loss_pattern"
    return _NUMBER_SUFFIX.sub("", name)


def stats_label(kind: str) -> str:
    """``loss_zscore`` -> ``loss_zscore_*``, the seed's table label."""
    return f"{kind}_*" if kind in NUMBERED_KINDS else kind
