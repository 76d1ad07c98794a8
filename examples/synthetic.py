"""Simulated training runs with labelled anomalies, for the demo, the tests and the
detection benchmark. Seeded and pure: the same spec gives the same records.

The clean part is meant to look like real runs, because that is what false alarms are
made of: a power-law loss decay (its shape drawn from the seed), log-normal per-step
noise, heavy-tailed hard batches (Lomax, scaled with the noise: they are *not*
anomalies), a loss that falls as the LR anneals and at epoch boundaries, HF's logging
(the mean of the per-step losses over ``logging_steps``, rounded to 4 decimals; the LR
and grad norm of the logging step itself), eval rounds with accuracy, and prediction
examples drawn from a fixed pool of prompts, so a prompt comes back with its answer.

>>> spec = RunSpec(steps=20, logging_steps=10, eval_every=20, examples_per_eval=2)
>>> [sorted(r)[-2:] for r in simulate(spec)][:4]
[['loss', 'step'], ['loss', 'step'], ['eval_loss', 'step'], ['prompt', 'step']]
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ANOMALY_KINDS", "Anomaly", "RunSpec", "lr_at", "simulate"]

Schedule = Literal["cosine", "linear", "constant", "wsd"]

# kind -> default size; what ``size`` means is in the Anomaly docstring.
ANOMALY_KINDS: dict[str, float] = {
    "loss_spike": 3.0,
    "loss_zscore": 3.0,
    "lr_zscore": 10.0,
    "divergence_detected": 300.0,
    "loss_nonfinite": 0.0,
    "grad_norm_nonfinite": 0.0,
    "accuracy_drop": 20.0,
    "perfect_answer_high_loss": 2.5,
    "wrong_answer_low_loss": 0.03,
    "inverted_loss_pattern": 0.0,
    "conflicting_labels": 0.0,
}
_PROMPTS = 400  # the pool prediction examples are drawn from


@dataclass(frozen=True, slots=True)
class Anomaly:
    """``kind`` is the trigger kind a detector should report at ``step`` (or soon after,
    for slow ones). ``size`` (None: the kind's default in ``ANOMALY_KINDS``):

    - ``loss_spike``/``loss_zscore``: the per-step loss times ``size`` for ``duration``
      steps (default ``logging_steps``, so one logged mean holds at least half of it);
    - ``lr_zscore``: ``variant`` "scale" (LR times ``size`` for ``duration`` steps),
      "reset" (back to the peak; the schedule restarts there) or "collapse" (LR times
      0.01 from then on);
    - ``divergence_detected``: the loss grows as ``1 + t / size`` (doubles in ``size`` steps);
    - ``loss_nonfinite``: a NaN loss at ``step``; ``grad_norm_nonfinite``: NaN gradients
      for ``duration`` steps while the logged loss stays finite (HF filters it);
    - ``accuracy_drop``: eval accuracy ``size`` points lower from ``step`` on;
    - ``perfect_answer_high_loss``/``wrong_answer_low_loss``: at the next eval, one right
      answer with loss ``size`` / one wrong answer with loss ``size``;
    - ``inverted_loss_pattern``: from the next eval on, right answers cost what wrong ones
      did and the other way round; ``conflicting_labels``: at the next eval, a prompt
      seen before comes back with another golden answer.
    """

    kind: str
    step: int
    size: float | None = None
    variant: str = "scale"
    duration: int | None = None

    @property
    def magnitude(self) -> float:
        return ANOMALY_KINDS.get(self.kind, 3.0) if self.size is None else self.size


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
    epochs: int = 1
    hard_batch_rate: float = 0.01
    anomalies: tuple[Anomaly, ...] = field(default_factory=tuple)


def lr_at(spec: RunSpec, step: int) -> float:
    """The planned LR of ``spec.schedule`` (HF's shapes; WSD decays over the last 20 %)."""
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


@dataclass(slots=True)
class _Curve:
    """The clean loss: ``floor + amp * (t + 30) ** -alpha``, shape drawn from the seed."""

    floor: float
    amp: float
    alpha: float

    @classmethod
    def draw(cls, rng: random.Random) -> _Curve:
        floor, alpha = rng.uniform(0.4, 1.6), rng.uniform(0.3, 0.6)
        start = floor + rng.uniform(1.5, 6.0)
        return cls(floor, (start - floor) * 31**alpha, alpha)

    def at(self, step: int) -> float:
        return self.floor + self.amp * math.pow(step + 30, -self.alpha)


def simulate(spec: RunSpec) -> Iterator[dict[str, Any]]:
    """Metric records in HF order: a train record every ``logging_steps``, then at each
    ``eval_every`` the eval record and the prediction examples."""
    rng = random.Random(spec.seed)
    curve = _Curve.draw(rng)
    answers = [f"answer {k}" for k in range(_PROMPTS)]
    seen: list[int] = []
    window: list[float] = []
    for step in range(1, spec.steps + 1):
        lr = _lr(spec, step)
        loss, grad = _step_loss(spec, curve, step, lr, rng), abs(rng.gauss(1.0, 0.1))
        for a in spec.anomalies:
            loss, grad = _apply(spec, a, step, loss, grad)
        window.append(loss)
        if step % spec.logging_steps:
            continue
        yield {
            "step": step,
            "loss": round(sum(window) / len(window), 4),
            "learning_rate": lr,
            "grad_norm": grad,
            "epoch": round(spec.epochs * step / spec.steps, 4),
        }
        window.clear()
        if spec.eval_every and step % spec.eval_every == 0:
            yield from _evaluate(spec, curve, step, rng, answers, seen)


def _lr(spec: RunSpec, step: int) -> float:
    lr = lr_at(spec, step)
    for a in spec.anomalies:
        if a.kind != "lr_zscore" or step < a.step:
            continue
        if a.variant == "reset":
            restarted = RunSpec(
                steps=spec.steps - a.step + spec.warmup,
                schedule=spec.schedule,
                peak_lr=spec.peak_lr,
                warmup=spec.warmup,
            )
            lr = lr_at(restarted, step - a.step + spec.warmup)
        elif a.variant == "collapse":
            lr *= 0.01
        elif step < a.step + _duration(spec, a):
            lr *= a.magnitude
    return lr


def _duration(spec: RunSpec, a: Anomaly) -> int:
    return spec.logging_steps if a.duration is None else a.duration


def _step_loss(spec: RunSpec, curve: _Curve, step: int, lr: float, rng: random.Random) -> float:
    loss = curve.at(step)
    if step >= spec.warmup:  # annealing the LR lowers the loss
        loss *= 1 - 0.1 * (1 - min(1.0, lr_at(spec, step) / spec.peak_lr))
    loss *= 0.85 ** int(spec.epochs * (step - 1) / spec.steps)  # memorisation per epoch
    loss *= math.exp(rng.gauss(-(spec.noise**2) / 2, spec.noise))
    if rng.random() < spec.hard_batch_rate:  # Lomax(3): a power-law tail
        loss *= 1 + spec.noise * (rng.random() ** (-1 / 3) - 1)
    return loss


def _apply(spec: RunSpec, a: Anomaly, step: int, loss: float, grad: float) -> tuple[float, float]:
    if step < a.step:
        return loss, grad
    if a.kind in ("loss_spike", "loss_zscore") and step < a.step + _duration(spec, a):
        loss *= a.magnitude
    elif a.kind == "divergence_detected":
        loss *= 1 + (step - a.step) / a.magnitude
    elif a.kind == "loss_nonfinite" and step == a.step:
        loss = math.nan
    elif a.kind == "grad_norm_nonfinite" and step < a.step + _duration(spec, a):
        grad = math.nan
    return loss, grad


def _evaluate(
    spec: RunSpec, curve: _Curve, step: int, rng: random.Random, answers: list[str], seen: list[int]
) -> Iterator[dict[str, Any]]:
    accuracy = min(0.9, 0.35 + 0.08 * math.log1p(step / 50)) + rng.gauss(0, 0.01)
    eval_loss = curve.at(step) * 1.05 * math.exp(rng.gauss(0, 0.01))
    now = [a for a in spec.anomalies if step - spec.eval_every < a.step <= step]
    since = {a.kind for a in spec.anomalies if a.step <= step}
    if "accuracy_drop" in since:
        accuracy -= max(a.magnitude for a in spec.anomalies if a.kind == "accuracy_drop") / 100
    yield {"step": step, "eval_loss": round(eval_loss, 4), "eval_accuracy": round(accuracy, 4)}
    inverted = "inverted_loss_pattern" in since
    for i in range(spec.examples_per_eval):
        k = rng.randrange(_PROMPTS)
        right = rng.random() < accuracy
        costly = right == inverted  # a right answer is cheap unless the pattern is inverted
        loss = math.exp(rng.gauss(math.log(1.5 if costly else 0.3), 0.4))
        golden = answers[k]
        if i == 0:
            for a in now:
                if a.kind == "perfect_answer_high_loss":
                    right, loss = True, a.magnitude
                elif a.kind == "wrong_answer_low_loss":
                    right, loss = False, a.magnitude
                elif a.kind == "conflicting_labels" and seen:
                    k = seen[rng.randrange(len(seen))]
                    golden = answers[k] = f"relabelled {k}"
        seen.append(k)
        yield {
            "step": step,
            "prompt": f"question {k}",
            "golden_answer": golden,
            "model_answer": golden if right else f"wrong {k}",
            "matches": right,
            "loss": round(loss, 4),
        }
