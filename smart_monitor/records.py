"""One line of the trainer's metrics file (bytes) to one typed record.

Pure: no files, no clocks. The fast path is orjson; a line that orjson refuses is
retried with the standard library, which reads the bare ``NaN``/``Infinity`` tokens
that Python trainers write (``json.dumps`` emits them) as non-finite floats.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from smart_monitor.series import classify, main_loss_key

__all__ = [
    "DEFAULT_ALIASES",
    "MAX_DEPTH",
    "MAX_STEP",
    "NON_TRAIN_KEYS",
    "EvalRecord",
    "ExampleRecord",
    "MalformedLine",
    "Record",
    "SummaryRecord",
    "TrainRecord",
    "nesting_depth",
    "normalise_text",
    "parse_line",
    "to_record",
]

DEFAULT_ALIASES: Mapping[str, str] = {"lr": "learning_rate", "global_step": "step"}
# (slot, key) -> whether key is the run's main series of that slot (SeriesBook.is_main)
MainChoice = Callable[[str, str], bool] | None

_EXAMPLE_KEYS = ("prompt", "golden_answer", "model_answer")
_EXAMPLE = frozenset(_EXAMPLE_KEYS)
_SUMMARY = frozenset({"train_runtime", "train_samples_per_second", "total_flos"})
_EVAL = frozenset({"eval_loss", "eval_accuracy", "accuracy"})
# Any of these makes a record something other than train metrics (batch.py's bulk path
# leaves such lines to to_record).
NON_TRAIN_KEYS = _EXAMPLE | _SUMMARY | _EVAL
_BOM = b"\xef\xbb\xbf"
# A trainer's record is flat; a line nested deeper is no record, and a deep enough
# one overflows the parser's recursion (FAULTS.md #43). Steps past int64 are no step
# a trainer logs, and do not fit the batch path's arrays (#44).
MAX_DEPTH = 64
MAX_STEP = 2**63 - 1
# A loss beyond float32's range (3.4e38) is no number the trainer's float32, bf16 or
# fp16 arithmetic holds: in its own dtype it is infinity, and it is read as one
# (FAULTS.md #59). Kept finite, -1e308 would be a best model no later loss beats, and
# its square overflows every window it enters.
MAX_METRIC = 3.4028234663852886e38
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_BRACKET = re.compile(rb"[\[\]{}]")


class MalformedLine(ValueError):
    """A line that cannot become a record; ``reason`` is a short greppable token."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class TrainRecord:
    step: int
    loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    raw: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class EvalRecord:
    step: int
    eval_loss: float | None
    accuracy: float | None
    raw: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ExampleRecord:
    """A prediction example; ``step`` is None when the line has none (the latest step)."""

    step: int | None
    prompt: str
    golden_answer: str
    model_answer: str
    matches: bool
    loss: float | None
    raw: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SummaryRecord:
    """HF's end-of-training record (``train_runtime``, ``train_loss``): not a step."""

    step: int | None
    raw: Mapping[str, Any]


Record = TrainRecord | EvalRecord | ExampleRecord | SummaryRecord


def parse_line(
    line: bytes, aliases: Mapping[str, str] = DEFAULT_ALIASES, is_main: MainChoice = None
) -> Record | None:
    """Parse one line without its newline. Returns None for a blank line.

    >>> r = parse_line(b'{"step": 3, "loss": NaN, "lr": 0.1}')
    >>> r.step, r.loss, r.learning_rate, r.raw
    (3, nan, 0.1, {'step': 3, 'loss': nan, 'learning_rate': 0.1})
    """
    if line.startswith(_BOM):
        line = line[3:]
    line = line.strip()
    if not line:
        return None
    _check_depth(line)
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        data = _loads_lenient(line)
    if not isinstance(data, dict):
        raise MalformedLine("not_an_object", type(data).__name__)
    return to_record(data, aliases, is_main)


def _loads_lenient(line: bytes) -> Any:
    try:
        return json.loads(line.decode("utf-8", errors="replace"))
    except ValueError as exc:
        raise MalformedLine("invalid_json", str(exc)[:80]) from None
    except RecursionError:  # _check_depth counts brackets outside strings: never here
        raise MalformedLine("too_deep", f"over {MAX_DEPTH} levels") from None


def nesting_depth(line: bytes) -> int:
    """How deep arrays and objects nest in ``line`` (brackets inside strings aside).

    >>> nesting_depth(b'{"a": [1, {"b": "[[["}]}'), nesting_depth(b"[" * 5 + b"]" * 5)
    (3, 5)
    """
    depth = deepest = 0
    for bracket in _BRACKET.findall(_STRING.sub(b'""', line)):
        if bracket in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _check_depth(line: bytes) -> None:
    """Two C-speed counts for every line; the exact scan only for the rare line with
    more brackets than the limit."""
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and nesting_depth(line) > MAX_DEPTH:
        raise MalformedLine("too_deep", f"over {MAX_DEPTH} levels")


def to_record(
    data: Mapping[str, Any], aliases: Mapping[str, str] = DEFAULT_ALIASES,
    is_main: MainChoice = None,
) -> Record | None:
    """Tell the record kind from its fields. None: a record with nothing to monitor.

    ``is_main(slot, key)``: whether an evaluation under its own name (``eval_g1_loss``)
    is the run's main eval loss (the run's ``SeriesBook`` decides once, the first and
    plainest); without it, each record's own. An HF run evaluated on several sets logs
    one record per set: their losses are series of their own, not one eval loss that
    jumps between sets.

    >>> main = {}
    >>> def is_main(slot, key):
    ...     return main.setdefault(slot, key) == key
    >>> [to_record({"step": 9, k: 0.5}, {}, is_main).eval_loss
    ...  for k in ("eval_g0_loss", "eval_g1_loss")]
    [0.5, None]
    """
    if aliases:
        data = _apply_aliases(data, aliases)
    if not _EXAMPLE.isdisjoint(data):
        return _example(data)
    if not _SUMMARY.isdisjoint(data):
        return SummaryRecord(_optional_step(data), data)
    if not _EVAL.isdisjoint(data):
        acc = data.get("eval_accuracy", data.get("accuracy"))
        return EvalRecord(_step(data), _loss(data, "eval_loss"), _as_float("accuracy", acc), data)
    if "loss" in data:
        loss: float | None = _loss(data, "loss")
    else:  # no plain ``loss``: the main loss by the series rule (``total_loss``, a GAN's)
        main = main_loss_key(tuple(data))
        evaluated = None if main is not None else main_loss_key(tuple(data), "eval")
        if evaluated is not None:  # an evaluation under its own name (``eval_g0_loss``)
            main_eval = is_main is None or is_main("eval_loss", evaluated)
            return EvalRecord(_step(data), _loss(data, evaluated) if main_eval else None, None,
                              data)  # fmt: skip
        if main is None and "learning_rate" not in data and "grad_norm" not in data and not any(
            classify(k).role == "loss" for k in data  # a GAN's losses: watched as series
        ):
            return None
        try:
            loss = None if main is None else _loss(data, main)
        except MalformedLine:  # a setting named like a loss (``"loss_fn": "mse"``)
            loss = None
    return TrainRecord(
        _step(data), loss, _number(data, "learning_rate"), _number(data, "grad_norm"), data
    )


def _apply_aliases(data: Mapping[str, Any], aliases: Mapping[str, str]) -> Mapping[str, Any]:
    for alias in aliases:
        if alias in data:
            break
    else:
        return data
    out = dict(data)
    for alias, name in aliases.items():
        if alias in out and name not in out:
            out[name] = out.pop(alias)
    return out


def _example(data: Mapping[str, Any]) -> ExampleRecord:
    missing = [k for k in _EXAMPLE_KEYS if k not in data]
    if missing:
        raise MalformedLine("missing_field", ",".join(missing))
    golden, answer = str(data["golden_answer"]), str(data["model_answer"])
    matches = data.get("matches")
    if matches is None:
        matches = normalise_text(golden) == normalise_text(answer)
    elif not isinstance(matches, bool):
        raise MalformedLine("bad_type", "matches")
    return ExampleRecord(
        _optional_step(data),
        str(data["prompt"]),
        golden,
        answer,
        matches,
        _loss(data, "loss"),
        data,
    )


def normalise_text(text: str) -> str:
    """An answer or prompt as compared: whitespace folded, case folded."""
    return " ".join(text.split()).casefold()


def _step(data: Mapping[str, Any]) -> int:
    step = _optional_step(data)
    if step is None:
        raise MalformedLine("missing_field", "step")
    return step


def _optional_step(data: Mapping[str, Any]) -> int | None:
    step = data.get("step")
    if step is None:
        step = data.get("iteration")  # Detectron2's metrics.json
        if step is None:
            return None
    if type(step) is int and 0 <= step <= MAX_STEP:  # the common case, first
        return step
    if isinstance(step, bool) or not isinstance(step, int | float) or not math.isfinite(step):
        raise MalformedLine("bad_type", "step")
    if step < 0 or step > MAX_STEP or step != int(step):
        raise MalformedLine("bad_value", "step")
    return int(step)


def _number(data: Mapping[str, Any], key: str) -> float | None:
    return _as_float(key, data.get(key))


def _loss(data: Mapping[str, Any], key: str) -> float | None:
    """A loss; past ``MAX_METRIC`` it is infinite (a learning rate of 1e300 stays the
    absurd number it is: the LR z-score names it, FAULTS.md #44).

    >>> _loss({"loss": -1e308}, "loss"), _loss({"eval_loss": 2.5}, "eval_loss")
    (-inf, 2.5)
    """
    value = _as_float(key, data.get(key))
    if value is None or -MAX_METRIC <= value <= MAX_METRIC or value != value:
        return value
    return math.copysign(math.inf, value)


# Non-finite numbers as some JSON encoders write them (quoted, e.g. ``default=str``):
# a trainer whose loss went NaN must still get ``loss_nonfinite``, not a skipped line.
_NONFINITE_STRINGS = {
    "nan": math.nan, "-nan": math.nan, "+nan": math.nan,
    "inf": math.inf, "+inf": math.inf, "infinity": math.inf, "+infinity": math.inf,
    "-inf": -math.inf, "-infinity": -math.inf,
}


def _as_float(key: str, value: Any) -> float | None:
    """A metric's number; a quoted non-finite token is that number.

    >>> _as_float("loss", "NaN"), _as_float("loss", "-Infinity")
    (nan, -inf)
    """
    if value is None or type(value) is float:
        return value
    if isinstance(value, str) and value.strip().lower() in _NONFINITE_STRINGS:
        return _NONFINITE_STRINGS[value.strip().lower()]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedLine("bad_type", key)
    if abs(value) > MAX_METRIC:  # an int of 400 digits: float() would raise
        return math.copysign(math.inf, value)
    return float(value)
