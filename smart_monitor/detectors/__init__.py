"""The registry: every detector the config enables, in a fixed order.

A new detector is registered here once and gets the shared checks in
``tests/test_detectors.py`` (resume, rewind, JSON state) for free.
"""

from __future__ import annotations

from collections.abc import Callable

from smart_monitor.config import DetectorsConfig
from smart_monitor.detectors.base import Detector
from smart_monitor.detectors.evaluation import AccuracyDrop, BestModel
from smart_monitor.detectors.labels import ConflictingLabels
from smart_monitor.detectors.loss import Divergence, LossSpike, NonFinite
from smart_monitor.detectors.not_learning import NotLearning
from smart_monitor.detectors.overfitting import Overfitting
from smart_monitor.detectors.predictions import InvertedLossPattern, PredictionOutliers
from smart_monitor.detectors.series import SeriesLosses
from smart_monitor.detectors.zscore import LossZScore, LrZScore

__all__ = ["REGISTRY", "Detector", "build_detectors"]

REGISTRY: dict[str, Callable[[DetectorsConfig], Detector]] = {
    "loss_zscore": lambda c: LossZScore(c.loss_zscore, c.texture),
    "lr_zscore": lambda c: LrZScore(c.lr_zscore),
    "loss_spike": lambda c: LossSpike(c.loss_spike, c.texture),
    "divergence": lambda c: Divergence(c.divergence),
    "nonfinite": lambda c: NonFinite(c.nonfinite),
    "best_model": lambda c: BestModel(c.best_model),
    "accuracy_drop": lambda c: AccuracyDrop(c.accuracy_drop),
    "overfitting": lambda c: Overfitting(c.overfitting),
    "not_learning": lambda c: NotLearning(c.not_learning),
    "prediction_outliers": lambda c: PredictionOutliers(c.predictions),
    "inverted_loss_pattern": lambda c: InvertedLossPattern(c.predictions),
    "conflicting_labels": lambda c: ConflictingLabels(c.conflicting_labels),
    "series_losses": SeriesLosses,  # each part follows its own section's ``enabled``
}

_SECTION = {
    "prediction_outliers": "predictions", "inverted_loss_pattern": "predictions",
    "series_losses": "nonfinite",
}


def build_detectors(config: DetectorsConfig) -> dict[str, Detector]:
    """Name -> detector for every enabled section of ``[detectors]``."""
    out: dict[str, Detector] = {}
    for name, make in REGISTRY.items():
        section = getattr(config, _SECTION.get(name, name))
        if section.enabled:
            out[name] = make(config)
    return out
