"""Simulated training runs with labelled anomalies, for the demo, the tests and the
detection benchmark. Seeded and pure: the same arguments give the same records."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Anomaly", "RunSpec", "simulate"]

Schedule = Literal["cosine", "linear", "constant", "wsd"]


@dataclass(frozen=True, slots=True)
class Anomaly:
    """``kind`` is the trigger kind a detector should report at ``step`` (or soon after,
    for slow ones such as ``divergence_detected``)."""

    kind: str
    step: int
    size: float = 3.0


@dataclass(frozen=True, slots=True)
class RunSpec:
    steps: int = 3000
    seed: int = 0
    noise: float = 0.05
    schedule: Schedule = "cosine"
    peak_lr: float = 3e-4
    warmup: int = 100
    logging_steps: int = 1
    eval_every: int = 250
    examples_per_eval: int = 10
    anomalies: tuple[Anomaly, ...] = field(default_factory=tuple)


def _lr(spec: RunSpec, step: int) -> float:
    if step < spec.warmup:
        return spec.peak_lr * (step + 1) / spec.warmup
    frac = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    if spec.schedule == "constant":
        return spec.peak_lr
    if spec.schedule == "linear":
        return spec.peak_lr * (1 - frac)
    if spec.schedule == "wsd":
        return spec.peak_lr if frac < 0.8 else spec.peak_lr * (1 - frac) / 0.2
    return spec.peak_lr * 0.5 * (1 + math.cos(math.pi * frac))


def simulate(spec: RunSpec) -> Iterator[dict[str, Any]]:
    """Metric records in HF order: train records every ``logging_steps`` (the mean of
    the per-step losses, as HF logs it), then eval and prediction examples."""
    rng = random.Random(spec.seed)
    by_step = {a.step: a for a in spec.anomalies}
    diverging_from = min((a.step for a in spec.anomalies if a.kind == "divergence_detected"), default=None)
    window: list[float] = []
    for step in range(1, spec.steps + 1):
        loss = (0.6 + 2.5 * (step + 30) ** -0.45) * math.exp(rng.gauss(0, spec.noise))
        if diverging_from is not None and step >= diverging_from:
            loss *= 1 + (step - diverging_from) / 200
        a = by_step.get(step)
        if a is not None and a.kind in ("loss_spike", "loss_zscore"):
            loss *= a.size
        window.append(loss)
        if step % spec.logging_steps:
            continue
        record: dict[str, Any] = {
            "step": step,
            "loss": sum(window) / len(window),
            "learning_rate": _lr(spec, step),
            "grad_norm": abs(rng.gauss(1.0, 0.1)),
            "epoch": step / spec.steps,
        }
        window.clear()
        if a is not None and a.kind == "lr_zscore":
            record["learning_rate"] *= a.size * 10
        if a is not None and a.kind == "loss_nonfinite":
            record["loss"] = math.nan
        if a is not None and a.kind == "grad_norm_nonfinite":
            record["grad_norm"] = math.nan
        yield record
        if spec.eval_every and step % spec.eval_every == 0:
            yield from _evaluate(spec, step, rng, a)


def _evaluate(spec: RunSpec, step: int, rng: random.Random, a: Anomaly | None) -> Iterator[dict[str, Any]]:
    accuracy = min(0.95, 0.5 + 0.1 * math.log1p(step / 100))
    if a is not None and a.kind == "accuracy_drop":
        accuracy -= 0.2
    yield {"step": step, "eval_loss": 0.55 + 2.0 * (step + 30) ** -0.45, "eval_accuracy": accuracy}
    for i in range(spec.examples_per_eval):
        right = rng.random() < accuracy
        loss = abs(rng.gauss(0.3 if right else 1.6, 0.1))
        if a is not None and i == 0:
            if a.kind == "perfect_answer_high_loss":
                right, loss = True, 2.0 + a.size
            elif a.kind == "wrong_answer_low_loss":
                right, loss = False, 0.02
        yield {
            "step": step,
            "prompt": f"question {i}",
            "golden_answer": f"answer {i}",
            "model_answer": f"answer {i}" if right else f"wrong {i}",
            "matches": right,
            "loss": round(loss, 4),
        }
