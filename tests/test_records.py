"""Every line kind of DESIGN.md, and every way a line can be bad."""

from __future__ import annotations

import math

import pytest

from smart_monitor.records import (
    NON_TRAIN_KEYS,
    EvalRecord,
    ExampleRecord,
    MalformedLine,
    SummaryRecord,
    TrainRecord,
    parse_line,
    to_record,
)


def test_train_record_with_aliases() -> None:
    r = parse_line(b'{"global_step": 12, "lr": 0.001, "loss": 1.5, "grad_norm": 0.9, "epoch": 0.1}')
    assert r == TrainRecord(12, 1.5, 0.001, 0.9, r.raw)  # type: ignore[union-attr]
    assert r.raw["learning_rate"] == 0.001  # type: ignore[union-attr]


def test_configured_alias_for_train_loss() -> None:
    r = parse_line(b'{"step": 3, "train/loss": 2.0}', {"train/loss": "loss"})
    assert isinstance(r, TrainRecord) and r.loss == 2.0


def test_a_record_without_plain_loss_takes_its_main_loss_by_the_series_rule() -> None:
    # issue 14: any name with "loss" in it is a loss; the plainest is the main one
    r = parse_line(b'{"step": 3, "train/loss": 2.0}')
    assert isinstance(r, TrainRecord) and r.loss == 2.0
    r = parse_line(b'{"iteration": 19, "loss_cls": 0.5, "total_loss": 1.5, "lr": 1e-5}')
    assert isinstance(r, TrainRecord) and (r.step, r.loss, r.learning_rate) == (19, 1.5, 1e-5)
    # a GAN's losses are not minimised: no main loss, each watched as its own series
    r = parse_line(b'{"step": 1, "train_gen_loss": NaN, "train_disc_loss": NaN}')
    assert isinstance(r, TrainRecord) and r.loss is None and math.isnan(r.raw["train_gen_loss"])
    assert parse_line(b'{"step": 3, "epoch": 2.0}') is None  # nothing a detector reads


@pytest.mark.parametrize(
    ("token", "check"),
    [
        (b"NaN", math.isnan),
        (b"Infinity", lambda v: v == math.inf),
        (b"-Infinity", lambda v: v == -math.inf),
    ],
)
def test_bare_non_finite_tokens_are_numbers(token: bytes, check: object) -> None:
    r = parse_line(b'{"step": 5, "loss": ' + token + b', "grad_norm": ' + token + b"}")
    assert isinstance(r, TrainRecord)
    assert check(r.loss) and check(r.grad_norm)  # type: ignore[operator]


def test_eval_record_reads_accuracy_or_eval_accuracy() -> None:
    a = parse_line(b'{"step": 100, "eval_loss": 0.5, "eval_accuracy": 0.8}')
    b = parse_line(b'{"step": 100, "accuracy": 0.7}')
    assert isinstance(a, EvalRecord) and a.accuracy == 0.8 and a.eval_loss == 0.5
    assert isinstance(b, EvalRecord) and b.accuracy == 0.7 and b.eval_loss is None


def test_hf_summary_record_is_not_a_step() -> None:
    line = b'{"step": 3000, "train_runtime": 812.3, "train_loss": 0.71, "total_flos": 1e15}'
    assert isinstance(parse_line(line), SummaryRecord)


def test_example_matches_computed_when_missing() -> None:
    r = parse_line(
        b'{"prompt": "2+2?", "golden_answer": " Four ", "model_answer": "four", "loss": 0.2}'
    )
    assert isinstance(r, ExampleRecord)
    assert r.matches is True and r.step is None


def test_example_explicit_matches_wins() -> None:
    line = b'{"step": 4, "prompt": "p", "golden_answer": "a", "model_answer": "a", '
    line += b'"matches": false, "loss": 1}'
    r = parse_line(line)
    assert isinstance(r, ExampleRecord) and r.matches is False and r.step == 4


def test_bom_crlf_and_blank_lines() -> None:
    assert parse_line(b"\xef\xbb\xbf" + b'{"step": 1, "loss": 1.0}\r') is not None
    assert parse_line(b"") is None
    assert parse_line(b"   \r") is None


def test_duplicate_keys_last_wins() -> None:
    r = parse_line(b'{"step": 1, "loss": 1.0, "loss": 2.0}')
    assert isinstance(r, TrainRecord) and r.loss == 2.0


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"not json at all", "invalid_json"),
        (b'{"step": 1, "loss": 1.0', "invalid_json"),
        (b"[1, 2, 3]", "not_an_object"),
        (b'{"loss": 1.0}', "missing_field"),
        (b'{"step": "ten", "loss": 1.0}', "bad_type"),
        (b'{"step": 1, "loss": "high"}', "bad_type"),
        (b'{"step": -4, "loss": 1.0}', "bad_value"),
        (b'{"step": 1.5, "loss": 1.0}', "bad_value"),
        (b'{"step": 1, "prompt": "p", "loss": 1.0}', "missing_field"),
        (
            b'{"step": 1, "prompt": "p", "golden_answer": "a", "model_answer": "a", "matches": 2}',
            "bad_type",
        ),
        (b'{"step": 1, "loss": 1.0}\xff\xfe garbage', "invalid_json"),
    ],
)
def test_malformed_lines_name_their_reason(line: bytes, reason: str) -> None:
    with pytest.raises(MalformedLine) as err:
        parse_line(line)
    assert err.value.reason == reason


def test_invalid_utf8_inside_a_string_is_replaced_not_fatal() -> None:
    r = parse_line(
        b'{"step": 1, "prompt": "caf\xe9", "golden_answer": "a", "model_answer": "a", "loss": NaN}'
    )
    assert isinstance(r, ExampleRecord) and "\ufffd" in r.prompt


@pytest.mark.parametrize("key", sorted(NON_TRAIN_KEYS))
def test_each_non_train_key_makes_another_kind(key: str) -> None:
    """batch.py leaves lines with these keys to to_record: each must really be one."""
    example = {"prompt": "p", "golden_answer": "a", "model_answer": "a"}
    data = {"step": 1, "loss": 1.0, key: 1.0}
    if key in example:
        data |= example
    assert not isinstance(to_record(data), TrainRecord)
