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
    "base_kind",
    "kind_of",
    "problem_of",
    "short_name",
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
    ``name`` is the contract's name with its number (``loss_zscore_43.20``), made
    short when the number is absurd (``short_name``)."""

    kind: str
    name: str
    severity: Severity
    step: int
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.name) > MAX_NAME:
            object.__setattr__(self, "name", short_name(self.name))


def short_name(name: str) -> str:
    """At most ``MAX_NAME`` characters: a long number suffix in scientific form (no
    ``+``, so ``kind_of`` still reads it), else the name cut.

    >>> short_name("lr_zscore_" + "1" * 300 + ".00"), short_name("loss_spike_" + "9" * 80 + ".0pct")
    ('lr_zscore_1.11e299', 'loss_spike_1.00e80pct')
    """
    found = _NUMBER_SUFFIX.search(name)
    if found is not None:
        mantissa, exponent = f"{float(found.group(0)[1:].removesuffix('pct')):.2e}".split("e")
        name = f"{name[: found.start()]}_{mantissa}e{int(exponent)}{found.group(1) or ''}"
    return name[:MAX_NAME]


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
    "not_learning",
)
# Conclusions about a run (detectors/overfitting.py, not_learning.py): warnings, once
# per episode, whose name carries the step of the best model.
OVERFITTING = "overfitting"
_OVERFITTING_NAME = "overfitting_from_"
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
    (
        *NUMBERED_KINDS, *CRITICAL_KINDS, WEIGHTS_NONFINITE, OVERFITTING, "conflicting_labels",
        "MULTIPLE_TRIGGERS",
    )
)
_NUMBER_SUFFIX = re.compile(r"_-?[0-9][0-9.]*(?:e-?[0-9]+)?(pct)?$")
# A trigger name is part of a snapshot's folder name, which NAME_MAX caps at 255 bytes:
# an absurd value (an LR of 1e300 is a z of 1e300) is written in short scientific form.
MAX_NAME = 64


# Kinds that report one problem: their detections form one incident, one snapshot.
_PROBLEM = {
    "loss_zscore": "loss_spike",
    "loss_spike": "loss_spike",
    "loss_nonfinite": "nonfinite",
    "grad_norm_nonfinite": "nonfinite",
    "perfect_answer_high_loss": "prediction_outlier",
    "wrong_answer_low_loss": "prediction_outlier",
}


# A loss series' trigger names (detectors/series.py) read back as kinds (kind_of): its
# name, then one of these; the trigger's own kind is the seed's.
_SERIES_SUFFIXES = {
    "_nonfinite": "loss_nonfinite", "_spike": "loss_spike",
    "_divergence_detected": "divergence_detected",
}


def base_kind(kind: str) -> str:
    """The seed's kind behind a loss series' trigger name read back from a log line
    (``kind_of``), for ``on_triggers`` and the stats table; a seed kind itself.

    >>> base_kind("val_cls_loss_nonfinite"), base_kind("train_gen_loss_spike")
    ('loss_nonfinite', 'loss_spike')
    >>> base_kind("grad_norm_nonfinite")
    'grad_norm_nonfinite'
    """
    if kind in KINDS:
        return kind
    for suffix, seed in _SERIES_SUFFIXES.items():
        if kind.endswith(suffix):
            return seed
    return kind


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
    >>> kind_of("overfitting_from_20000"), kind_of("not_learning_500")
    ('overfitting', 'not_learning')
    """
    if name.startswith("inverted_loss_pattern"):
        return "inverted_loss_pattern"
    if name.startswith(_OVERFITTING_NAME):
        return OVERFITTING
    return _NUMBER_SUFFIX.sub("", name)


def stats_label(kind: str) -> str:
    """``loss_zscore`` -> ``loss_zscore_*``, the seed's table label."""
    if kind == OVERFITTING:
        return f"{_OVERFITTING_NAME}*"
    return f"{kind}_*" if base_kind(kind) in NUMBERED_KINDS else kind
