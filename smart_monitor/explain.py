"""A snapshot's explanation: its trigger's entry (``meanings.py``) made specific with the
snapshot's own figures and, when a checkpoint was pinned, the exact rollback.

Pure: ``explain`` reads a ``metadata.json`` mapping and the snapshot's folder name and
touches no file, so the writer stores its result as the ``explanation`` block, and
``show`` and ``report`` compute it again from the metadata as it is now (weights
released since, the folder moved) with the same words.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from smart_monitor.meanings import ENTRIES, Entry, family_of, lookup

__all__ = ["Explanation", "causes_sentence", "explain"]

_ORDER = {e.family: i for i, e in enumerate(ENTRIES)}
_MULTIPLE = next(e for e in ENTRIES if e.family == "MULTIPLE_TRIGGERS")
_UNKNOWN = Entry(  # a trigger of a newer version, read by an older one
    "unknown", "This version has no entry for this trigger.",
    ("not known to this version of smart_monitor",),
    ("Read the trigger's details in `show --json`.",), "watch: look at the figures.",
)


@dataclass(frozen=True, slots=True)
class Explanation:
    """``trigger``: the snapshot's most serious trigger; ``evidence``: the snapshot's
    figures in one sentence; the rest from that trigger's entry, its action chosen by the
    snapshot's severity."""

    trigger: str
    evidence: str
    what: str
    causes: tuple[str, ...]
    checks: tuple[str, ...]
    action: str
    rollback: str

    @property
    def meaning(self) -> str:
        return f"{self.evidence}. {self.what} {causes_sentence(self.causes)}"

    def to_dict(self) -> dict[str, Any]:
        """The ``explanation`` block of ``metadata.json``."""
        return {
            "meaning": self.meaning,
            "checks": list(self.checks),
            "action": self.action,
            "rollback": self.rollback,
        }


def explain(meta: Mapping[str, Any], snapshot: str) -> Explanation:
    """The explanation of the snapshot at ``snapshot`` whose metadata is ``meta``.
    Never raises on odd metadata: a figure that is missing is said to be."""
    names = [str(n) for n in meta.get("triggers") or ()]
    found = sorted(
        ((family_of(n), n) for n in names), key=lambda fn: _ORDER.get(fn[0] or "", len(_ORDER))
    )
    family, name = found[0] if found else (None, "")
    entry = (lookup(family) if family else None) or _UNKNOWN
    critical = meta.get("severity") == "critical"
    if len(names) >= 3:
        entry_action = _MULTIPLE.if_critical
    else:
        entry_action = entry.if_critical if critical and entry.if_critical else entry.action
    what = entry.what if len(names) < 2 else f"{_MULTIPLE.what} {entry.what}"
    evidence = "; ".join(_evidence(f, n, meta) for f, n in found) or "no trigger recorded"
    causes = entry.critical_causes if critical and entry.critical_causes else entry.causes
    rollback = _rollback(family, name, meta, snapshot)
    return Explanation(name, evidence, what, causes, entry.checks, entry_action, rollback)


def causes_sentence(causes: Sequence[str]) -> str:
    return "Likely causes, most likely first: " + "; ".join(causes) + "."


# -- the figures ----------------------------------------------------------------------
def _float(value: Any) -> float | None:
    """A figure as metadata holds it: a number, or "NaN"/"Infinity" (``json_safe``)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _num(value: Any) -> str:
    """Four significant digits, an integral float with its ``.0`` (an LR of 20.0), an
    integer as it is (a count, a step).

    >>> _num(20.0), _num(5.225999), _num(3e-06), _num(float("nan")), _num(None), _num(3)
    ('20.0', '5.226', '3e-06', 'NaN', 'not logged', '3')
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    v = _float(value)
    if v is None:
        return "not logged"
    if not math.isfinite(v):
        return "NaN" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if v.is_integer() and abs(v) < 1e6:
        return f"{v:.1f}"
    return f"{v:.4g}"


def _ratio(value: Any, base: Any) -> str:
    v, b = _float(value), _float(base)
    if v is None or b is None or b == 0 or not math.isfinite(v / b):
        return ""
    return f"{v / b:.2f}x "


def _points(meta: Mapping[str, Any], key: str) -> list[tuple[int, float]]:
    out = []
    for point in meta.get(key) or ():
        if isinstance(point, Sequence) and len(point) == 2:
            step, value = _float(point[0]), _float(point[1])
            if step is not None and value is not None:
                out.append((int(step), value))
    return out


def _lr_context(meta: Mapping[str, Any], step: int) -> str:
    """"LR unchanged at 20.0"; where it changed, if once within the recent history; else
    where it stood at the history's start (a schedule that moves every step)."""
    lrs = [(s, v) for s, v in _points(meta, "lr_history") if s <= step]
    if not lrs:
        return f"LR {_num((meta.get('metrics') or {}).get('learning_rate'))}"
    now = lrs[-1][1]
    changes = [i for i in range(1, len(lrs)) if lrs[i][1] != lrs[i - 1][1]]
    if not changes:
        return f"LR unchanged at {_num(now)}"
    if len(changes) == 1:
        i = changes[0]
        return f"LR {_num(now)}, changed from {_num(lrs[i - 1][1])} at step {lrs[i][0]}"
    return f"LR {_num(now)}, {_num(lrs[0][1])} at step {lrs[0][0]}"


def _context(meta: Mapping[str, Any], step: int) -> str:
    metrics = meta.get("metrics") or {}
    grad = metrics.get("grad_norm")
    return f"{_lr_context(meta, step)}; grad norm {_num(grad)}"


def _last_finite(meta: Mapping[str, Any], step: int) -> str:
    """The last finite loss before ``step``; "" without a history of this loss."""
    if "loss_history" not in meta:
        return ""
    finite = [(s, v) for s, v in _points(meta, "loss_history") if s < step and math.isfinite(v)]
    if not finite:
        return ", no finite loss logged before it"
    s, v = finite[-1]
    return f", last finite loss {_num(v)} at step {s}"


Figures = Callable[[Mapping[str, Any], Mapping[str, Any], int], str]


def _z(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    return (
        f"loss {_num(d.get('value'))} at step {step}, {_ratio(d.get('value'), d.get('mean'))}"
        f"its recent mean {_num(d.get('mean'))} (z {_num(d.get('z'))}); {_context(meta, step)}"
    )


def _spike(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    return (
        f"loss {_num(d.get('value'))} at step {step}, "
        f"{_ratio(d.get('value'), d.get('baseline'))}its recent median "
        f"{_num(d.get('baseline'))}; {_context(meta, step)}"
    )


def _divergence(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    return (
        f"smoothed loss {_num(d.get('smoothed'))} at step {step}, "
        f"{_ratio(d.get('smoothed'), d.get('best'))}its best {_num(d.get('best'))}; "
        f"{_context(meta, step)}"
    )


def _nonfinite(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    return (
        f"loss {_num(d.get('value'))} at step {step}{_last_finite(meta, step)}; "
        f"{_context(meta, step)}"
    )


def _grad(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    before = d.get("previous_nonfinite_step")
    again = "isolated" if before is None else f"previous non-finite grad norm at step {before}"
    loss = (meta.get("metrics") or {}).get("loss")
    return f"grad norm {_num(d.get('value'))} at step {step} ({again}); loss {_num(loss)}; " + (
        _lr_context(meta, step)
    )


def _lr(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    lrs = [v for s, v in _points(meta, "lr_history") if s < step]
    before = f", after {_num(lrs[-1])}" if lrs else ""
    loss = (meta.get("metrics") or {}).get("loss")
    return (
        f"LR {_num(d.get('value'))} at step {step}{before}, where its schedule gave about "
        f"{_num(d.get('expected'))} (z {_num(d.get('z'))}); loss {_num(loss)}"
    )


_SOURCES = {"eval_loss": "eval loss", "train_loss_smoothed": "smoothed train loss"}


def _best(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    source = _SOURCES.get(str(d.get("source")), "loss")
    return f"{source} {_num(d.get('value'))} at step {step}, the best so far"


def _accuracy(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    metrics = meta.get("metrics") or {}
    now = metrics.get("eval_accuracy", metrics.get("accuracy"))
    return (
        f"accuracy {_num(now)} at step {step}, {_num(d.get('value'))} points below its best "
        f"{_num(d.get('best'))} at step {d.get('best_step')}"
    )


def _example(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    return (
        f"example at step {step} with loss {_num(d.get('loss'))}: prompt "
        f"{_quote(d.get('prompt'))}, golden {_quote(d.get('golden_answer'))}, model "
        f"{_quote(d.get('model_answer'))}"
    )


def _inverted(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    return (
        f"at step {step}, {d.get('n_correct')} right answers cost "
        f"{_num(d.get('correct_mean_loss'))} on average against "
        f"{_num(d.get('wrong_mean_loss'))} for {d.get('n_wrong')} wrong ones "
        f"(p {_num(d.get('p_value'))})"
    )


def _labels(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    answers = ", ".join(_quote(a) for a in d.get("answers") or ())
    return (
        f"prompt {_quote(d.get('prompt'))} at step {step} has golden answers {answers} "
        f"(first seen at step {d.get('first_step')})"
    )


def _weights(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    return f"checkpoint at step {step}: {d.get('tensors', d.get('value'))} tensors with NaN/Inf"


def _norm(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    return (
        f"weight norm {_num(d.get('value'))} at step {step}, after {_num(d.get('previous'))} "
        f"(z {_num(d.get('z'))})"
    )


def _overfitting(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    best = _conclusion(meta, "overfitting", d)
    rest = _figures(best, skip=("best_value", "best_step", "best_snapshot", "snapshot",
                                "best_snapshot_step"))
    return (
        f"eval at step {step} worse than its best {_num(best.get('best_value'))} at step "
        f"{best.get('best_step')}: {rest}"
    ).removesuffix(": ")


def _generic(d: Mapping[str, Any], meta: Mapping[str, Any], step: int) -> str:
    return f"at step {step}: {_figures(d)}".removesuffix(": ")


_FIGURES: dict[str, Figures] = {
    "loss_zscore": _z,
    "loss_spike": _spike,
    "divergence_detected": _divergence,
    "loss_nonfinite": _nonfinite,
    "grad_norm_nonfinite": _grad,
    "lr_zscore": _lr,
    "best_model_loss": _best,
    "accuracy_drop": _accuracy,
    "perfect_answer_high_loss": _example,
    "wrong_answer_low_loss": _example,
    "inverted_loss_pattern": _inverted,
    "conflicting_labels": _labels,
    "weights_nonfinite": _weights,
    "weight_norm_zscore": _norm,
    "overfitting": _overfitting,
}


def _evidence(family: str | None, name: str, meta: Mapping[str, Any]) -> str:
    details = (meta.get("details") or {}).get(name) or {}
    step_value = _float(meta.get("step"))
    step = int(step_value) if step_value is not None and math.isfinite(step_value) else 0
    figures = _FIGURES.get(family or "", _generic)
    other_series = family is not None and not name.startswith(family)
    if other_series:  # ``val_cls_loss_nonfinite``: the loss history is the main loss's
        meta = {k: v for k, v in meta.items() if k != "loss_history"}
    text = figures(details, meta, step)
    named = family is None or other_series or figures is _generic
    return f"{name}: {text}" if named else text


def _conclusion(meta: Mapping[str, Any], key: str, details: Mapping[str, Any]) -> dict[str, Any]:
    """A conclusion's evidence: its metadata block (DESIGN.md), over its trigger's details."""
    block = meta.get(key)
    return {**details, **(block if isinstance(block, Mapping) else {})}


def _figures(values: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    return ", ".join(
        f"{k.replace('_', ' ')} {_num(v) if _float(v) is not None else v}"
        for k, v in values.items() if k not in skip and not isinstance(v, Mapping | list)
    )


def _quote(text: Any, limit: int = 60) -> str:
    s = str(text)
    return repr(s if len(s) <= limit else s[: limit - 3] + "...")


# -- the rollback ---------------------------------------------------------------------
def _rollback(family: str | None, name: str, meta: Mapping[str, Any], snapshot: str) -> str:
    step = meta.get("step")
    if family == "overfitting":
        return _best_snapshot(meta, name)
    ck = meta.get("checkpoint")
    if not isinstance(ck, Mapping):
        note = str(meta.get("note") or "")
        if note and not note.startswith("no complete checkpoint"):  # vanished, abandoned
            return f"nothing pinned: {note}."
        if family == "best_model_loss":
            return (
                "no checkpoint existed at this step: this best model's weights were not "
                "kept (have the trainer save at each evaluation, HF save_strategy = "
                "eval_strategy)."
            )
        return (
            "no checkpoint existed before this step: nothing to roll back to (have the "
            "trainer save checkpoints, e.g. HF save_steps, so that the next one has one)."
        )
    released = meta.get("released")
    if isinstance(released, Mapping):
        return (
            f"this snapshot's weights were released by the disk budget at "
            f"{released.get('at')}; the trainer's own {ck.get('name')} ({ck.get('path')}) "
            "may still exist."
        )
    model = str(PurePath(snapshot) / "model")
    how = _resume(str(ck.get("name")), model)
    if family == "best_model_loss":
        return f"{ck.get('name')} (step {ck.get('step')}) is pinned in this snapshot: {how}."
    if family in _SCANNED and ck.get("step") == step:
        return (
            f"this snapshot pins the scanned {ck.get('name')} itself, for inspection "
            f"(smart-monitor inspect {model}): roll back to an earlier checkpoint whose "
            "weights inspect finds finite."
        )
    when = (
        f"saved at step {step} itself, so it may hold that step's update already"
        if ck.get("step") == step else f"the last checkpoint before step {step}"
    )
    return f"roll back to {ck.get('name')} (step {ck.get('step')}, {when}), pinned in this " + (
        f"snapshot: {how}."
    )


# Fired by the checkpoint scan from the weights of checkpoint-S, which the snapshot pins.
_SCANNED = frozenset({"weights_nonfinite", "weight_norm_zscore"})


def _resume(name: str, model: str) -> str:
    """The trainer's option that resumes from the pinned copy: a folder is HF's, a
    ``.ckpt`` file Lightning's."""
    if name.endswith(".ckpt"):
        return f'Lightning trainer.fit(model, ckpt_path="{model}/{name}")'
    if PurePath(name).suffix:
        return f"load {model}/{name} with your trainer's resume option"
    return f'HF trainer.train(resume_from_checkpoint="{model}")'


def _best_snapshot(meta: Mapping[str, Any], name: str) -> str:
    block = _conclusion(meta, "overfitting", (meta.get("details") or {}).get(name) or {})
    best = block.get("best_snapshot", block.get("snapshot"))
    where = f"step {block.get('best_step')}"
    if not best:
        return f"the best model ({where}) has no snapshot: keep its checkpoint if it still exists."
    model = PurePath(str(best)) / "model"
    kept = block.get("best_snapshot_step")
    if kept is not None and kept != block.get("best_step"):  # a best too small to snapshot
        return (f"the best model ({where}) made no snapshot of its own; the nearest kept "
                f"(step {kept}) is in {model}: use it, not the latest weights.")
    return f"use the best model ({where}), kept in {model}, not the latest weights."
