"""One step's values as entries, the way the trainer's JSONL would hold them. Shared
by the TensorBoard and CSV readers; no reader's library needed (a CSV run needs no
tensorboard extra)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from smart_monitor.series import SUMMARY_KEYS, classify

__all__ = ["WRITER_STARTED", "split_step"]

# The key of the entry a reader puts before the first entry of a new writer: a file
# it had not followed before, or an elapsed-time column that went back (a new
# process writing on into the same CSV). A step counter that goes back right after
# one is a new run unless a checkpoint says it is a resume (``Pipeline.writer_started``).
WRITER_STARTED = "__writer_started__"


def split_step(step: int, values: Mapping[str, float]) -> list[dict[str, Any]]:
    """One step's values as the trainer's JSONL would hold them: train, eval and
    end-of-training summary apart (each kind only when present), in the order the
    trainer logged them. The keys are a ``SeriesBook``'s: ``loss`` and ``eval_loss`` are
    the main series, so a row with other losses but not the main one says so (None),
    and no other loss stands in for it (a GAN's generator row without the critic's).

    >>> split_step(5, {"loss": 1.0, "eval_loss": 2.0, "train_runtime": 3.0})
    [{'step': 5, 'loss': 1.0}, {'step': 5, 'eval_loss': 2.0}, {'step': 5, 'train_runtime': 3.0}]
    >>> split_step(6, {"generator_loss": 0.1})
    [{'step': 6, 'generator_loss': 0.1, 'loss': None}]
    """
    parts: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        kind = _kind(key)
        part = parts.get(kind)
        if part is None:
            part = parts[kind] = {"step": step}
        part[key] = value
    for kind, main in (("train", "loss"), ("eval", "eval_loss")):
        part = parts.get(kind)
        if part is not None and main not in part and any(
            classify(k).role == "loss" for k in part
        ):  # the main series not in this row: the others are still not the main one
            part[main] = None
    return list(parts.values())


def _kind(key: str) -> str:
    """Which entry a key goes to: HF's summary keys, else its series' split."""
    return "summary" if key in SUMMARY_KEYS else classify(key).split
