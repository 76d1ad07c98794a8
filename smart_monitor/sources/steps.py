"""One step's values as entries, the way the trainer's JSONL would hold them. Shared
by the TensorBoard and CSV readers; no reader's library needed (a CSV run needs no
tensorboard extra)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smart_monitor.series import SUMMARY_KEYS, classify

__all__ = ["split_step"]


def split_step(step: int, values: Mapping[str, float]) -> list[dict[str, Any]]:
    """One step's values as the trainer's JSONL would hold them: train, eval and
    end-of-training summary apart (each kind only when present), in the order the
    trainer logged them.

    >>> split_step(5, {"loss": 1.0, "eval_loss": 2.0, "train_runtime": 3.0})
    [{'step': 5, 'loss': 1.0}, {'step': 5, 'eval_loss': 2.0}, {'step': 5, 'train_runtime': 3.0}]
    """
    parts: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        kind = _kind(key)
        part = parts.get(kind)
        if part is None:
            part = parts[kind] = {"step": step}
        part[key] = value
    return list(parts.values())


def _kind(key: str) -> str:
    """Which entry a key goes to: HF's summary keys, else its series' split."""
    return "summary" if key in SUMMARY_KEYS else classify(key).split
