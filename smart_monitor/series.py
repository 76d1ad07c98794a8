"""Every scalar a run logs is a named series with a role: one rule, for every reader.

Pure: no files, no clocks. The JSONL ingest, the TensorBoard and the CSV readers all
ask this module what a name is, so a column means the same in every format.

The rule (``docs/sources.md`` has it as a table), on the lower-cased name split into
words at every non-alphanumeric character, with the folder it was written in (Keras's
``train/`` and ``validation/``, a ``SummaryWriter.add_scalars`` subfolder) as a prefix:

- ``step``, ``global_step``, ``iteration``: the step, not a series;
- HF's end-of-training ``train/train_loss``, ``train/train_runtime``, ...: a summary;
- a name with ``loss`` in it: a loss; one ending in ``_epoch`` is Lightning's aggregate
  of a ``_step`` series (kept, not watched);
- a word ``lr``/``lrN``, ``lr-<Optimizer>``, ``learning_rate``: a learning rate;
  ``grad_norm``/``gradient_norm``: a grad norm;
- a word that names a metric: higher is better for accuracy, mAP, precision, recall,
  f1, bleu, rouge, iou, auc, dice; lower for error, wer, cer, perplexity, mae, mse,
  rmse, mape;
- Keras's ``evaluation_loss_vs_iterations`` and the like (``other_axis``): the same
  values again on another step axis (iterations, not epochs): kept aside, no alarms;
- anything else: kept and shown, no alarms (``epoch``, ``time``, ``hp_metric``, ...).

A word ``val``, ``valid``, ``validation``, ``eval``, ``evaluation``, ``test`` makes a
series an eval series; ``train``/``training`` a train one; otherwise losses, learning
rates and grad norms are train series and metrics eval series.

Which loss is *the* train loss (the seed's ``loss`` triggers) and which the eval loss
(``best_model_loss``, ``eval_loss_nonfinite``): ``[records] loss`` when set, else the
plainest name (``loss``, ``train_loss_step``, ``epoch_loss`` before ``total_loss``
before ``train/box_loss``), the first seen among equals; the eval loss whose words
match the train loss's comes first (``val/box_loss`` for ``train/box_loss``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, TypeGuard

__all__ = [
    "MAIN_KEYS", "SUMMARY_KEYS", "Series", "SeriesBook", "classify", "main_loss_key", "other_axis",
    "qualified", "safe_name",
]

Role = Literal["step", "summary", "loss", "aggregate", "learning_rate", "grad_norm", "metric",
               "other"]  # fmt: skip
Split = Literal["train", "eval"]

_EVAL_WORDS = frozenset({"val", "valid", "validation", "eval", "evaluation", "test"})
_TRAIN_WORDS = frozenset({"train", "training"})
_STEP_NAMES = frozenset({"step", "global_step", "iteration", "iter"})
# HF Trainer's end-of-training record: one value per run, not a step's
SUMMARY_KEYS = frozenset(
    {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos",
     "train_loss"}
)
_HIGHER = ("accuracy", "acc", "map", "precision", "recall", "f1", "bleu", "rouge", "iou",
           "miou", "auc", "auroc", "dice")  # fmt: skip
_LOWER = ("error", "err", "wer", "cer", "perplexity", "ppl", "mae", "mse", "rmse", "mape",
          "smape")  # fmt: skip
# A GAN's generator, discriminator or critic loss: the players' losses balance, they
# are not minimised, so a flat or jumping one is no alarm (only a non-finite one is).
_ADVERSARIAL = frozenset({"gen", "generator", "disc", "discriminator", "critic", "adv",
                          "adversarial", "g", "d"})  # fmt: skip
_WORD = re.compile(r"[^0-9a-z]+")
_LR_WORD = re.compile(r"lr\d*$")
_NUMBERED = re.compile(r"(map|f1|iou|auc)\d*$")
# The record keys the typed records read (records.py): the main series take them.
MAIN_KEYS = frozenset({"loss", "eval_loss", "learning_rate", "grad_norm", "eval_accuracy",
                       "accuracy", "step"})  # fmt: skip


@dataclass(frozen=True, slots=True)
class Series:
    """What a name is. ``rank``: how plainly a loss (or LR) names *the* one (lower
    first); ``core``: its words less the split and aggregate words, to pair a train
    loss with its eval loss."""

    name: str
    role: Role
    split: Split
    direction: Literal["higher", "lower"] | None = None
    rank: int = 2
    core: tuple[str, ...] = ()
    adversarial: bool = False  # a GAN's loss: not minimised, so no trend means anything


def qualified(tag: str, place: str) -> str:
    """The series name of ``tag`` written in folder ``place`` (relative to the folder
    followed): an ``add_scalars`` subfolder (``loss_training``) is the name; a split
    folder (Keras's ``validation``) qualifies a plain tag, one that names no split or
    namespace of its own (``epoch_loss``, not YOLO's ``val/box_loss`` or
    ``metrics/mAP50(B)`` in a run folder that happens to be called ``train``); any other
    folder (Lightning's ``version_0``) is a run, not a name.

    >>> qualified("loss", "runs/loss_validation"), qualified("epoch_loss", "logs/validation")
    ('loss_validation', 'validation/epoch_loss')
    >>> qualified("val_loss", "version_1"), qualified("metrics/mAP50(B)", "detect/train")
    ('val_loss', 'metrics/mAP50(B)')
    """
    folder = place.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    if not folder:
        return tag
    if folder.startswith(tag.replace("/", "_") + "_"):
        return folder
    words = set(_WORD.split(tag.lower()))
    plain = "/" not in tag and not words & (_EVAL_WORDS | _TRAIN_WORDS)
    if plain and folder.lower() in _EVAL_WORDS | _TRAIN_WORDS:
        return f"{folder}/{tag}"
    return tag


def other_axis(name: str) -> bool:
    """A series logged against another step axis than the run's: Keras writes each
    validation metric twice, ``epoch_loss`` at epoch steps and
    ``evaluation_loss_vs_iterations`` at iteration steps. Read as a step of the run,
    the second would send the step counter back and forth every epoch.

    >>> other_axis("evaluation_loss_vs_iterations"), other_axis("epoch_loss")
    (True, False)
    """
    return name.endswith("_vs_iterations")


@lru_cache(maxsize=4096)
def classify(name: str) -> Series:
    """The role of ``name`` by the module's rule.

    >>> [classify(n).role for n in ("train_loss_step", "train_loss_epoch", "lr-Adam", "x/lr0")]
    ['loss', 'aggregate', 'learning_rate', 'learning_rate']
    >>> s = classify("validation/epoch_loss"); s.split, s.rank
    ('eval', 0)
    >>> s = classify("metrics/mAP50(B)"); s.role, s.split, s.direction
    ('metric', 'eval', 'higher')
    >>> classify("val/rmse_loss").role, classify("total_loss").rank, classify("epoch").role
    ('loss', 1, 'other')
    """
    low = name.lower()
    words = tuple(w for w in _WORD.split(low) if w)
    split: Split = "eval" if _EVAL_WORDS.intersection(words) else "train"
    trained = bool(_TRAIN_WORDS.intersection(words))
    if low in _STEP_NAMES:
        return Series(name, "step", "train")
    if low.startswith("train/") and low[6:] in SUMMARY_KEYS:
        return Series(name, "summary", "train")
    if other_axis(low):
        return Series(name, "other", split)
    core = tuple(w for w in words if w not in _EVAL_WORDS | _TRAIN_WORDS | {"step", "epoch"})
    if "loss" in low:
        if low.endswith("_epoch"):
            return Series(name, "aggregate", split)
        rank = 0 if core == ("loss",) else 1 if sorted(core) == ["loss", "total"] else 2
        adversarial = bool(_ADVERSARIAL.intersection(words))
        return Series(name, "loss", split, "lower", rank, core, adversarial)
    if "learning_rate" in low or low.startswith("lr-") or any(map(_LR_WORD.match, words)):
        return Series(name, "learning_rate", "train", rank=0 if low in ("lr", "learning_rate")
                      else 1)  # fmt: skip
    if ("grad" in words and "norm" in words) or "grad_norm" in low or "gradient_norm" in low:
        return Series(name, "grad_norm", "train")
    for word in words:
        if word in _HIGHER or _NUMBERED.match(word):
            return Series(name, "metric", "train" if trained else "eval", "higher", core=core)
        if word in _LOWER:
            return Series(name, "metric", "train" if trained else "eval", "lower", core=core)
    return Series(name, "other", split)


@lru_cache(maxsize=1024)
def main_loss_key(keys: tuple[str, ...], split: str = "train") -> str | None:
    """Of a record's keys (one without ``loss``), the train (or eval) loss the rule
    makes the main one: the plainest, the first among equals.

    >>> main_loss_key(("iteration", "loss_cls", "total_loss", "lr"))
    'total_loss'
    >>> main_loss_key(("eval_g0_loss", "eval_g0_accuracy", "step"), "eval")
    'eval_g0_loss'
    >>> main_loss_key(("critic_loss", "generator_loss")) is None  # a GAN's: watched apart
    True
    """
    found = [(s.rank, i, k) for i, k in enumerate(keys)
             if (s := classify(k)).role == "loss" and s.split == split
             and not s.adversarial]  # fmt: skip
    return min(found)[2] if found else None


def safe_name(name: str) -> str:
    """``name`` as a trigger prefix: filename-safe and short.

    >>> safe_name("val/cls_loss"), safe_name("metrics/mAP50-95(B)")
    ('val_cls_loss', 'metrics_map50_95_b')
    """
    return "_".join(w for w in _WORD.split(name.lower()) if w)[:40] or "series"


# The role a main series holds, and the record key it takes.
_SLOTS = {
    ("loss", "train"): "loss", ("loss", "eval"): "eval_loss",
    ("learning_rate", "train"): "learning_rate", ("grad_norm", "train"): "grad_norm",
}


class SeriesBook:
    """The run's series: what each record key is, the main ones, their last values.

    ``key(tag, place)`` names the record key of a scalar (the readers' side);
    ``observe(entry)`` notes the values of an entry or JSONL record (the ingest's side).
    A main series is decided once: the first and plainest of its role; a plainer one
    seen later takes over (``version`` counts the changes, for the readers' memos).
    """

    def __init__(self, aliases: Mapping[str, str], main_loss: str = "") -> None:
        self.aliases = dict(aliases)
        if main_loss:
            self.aliases.setdefault(main_loss, "loss")
        self.mains: dict[str, tuple[str, int]] = {}  # record key -> (series name, rank)
        self.names: dict[str, str] = {}  # record key -> series name, as the run wrote it
        self.last: dict[str, Any] = {}  # record key -> last value
        self.version = 0
        self._roles: tuple[tuple[int, int, int], dict[str, Series]] = ((-1, -1, -1), {})

    def key(self, tag: str, place: str = "") -> str:
        """The record key of scalar ``tag`` written in folder ``place``."""
        name = qualified(tag, place)
        alias = self.aliases.get(tag) or self.aliases.get(name)
        if alias is not None:
            self._main(alias, name, -1)
            return self._named(alias, name)
        series = classify(name)
        if series.role == "summary":
            return self._named(name.split("/", 1)[1], name)
        slot = None if series.adversarial else _SLOTS.get((series.role, series.split))
        if slot is None and series.role == "metric" and series.core in (("accuracy",), ("acc",)):
            slot = "eval_accuracy" if series.split == "eval" else None
        if slot is not None:
            rank = series.rank
            if slot == "eval_loss" and "loss" in self.mains:
                train = classify(self.mains["loss"][0])
                rank = 0 if series.core == train.core else rank + 1
            if self._main(slot, name, rank):
                return self._named(slot, name)
        plain = name[6:] if name.startswith("train/") and slot is None else name
        if plain.startswith("eval/"):
            plain = "eval_" + plain[5:]
        if plain in MAIN_KEYS:  # a "loss" that is not the main one (an alias chose another)
            plain = f"{name}/series"
        return self._named(plain, name)

    def is_main(self, slot: str, key: str) -> bool:
        """Whether a record's ``key`` is the run's main series of ``slot``: the first
        and plainest seen decides (a JSONL run's ``eval_g0_loss`` before ``eval_g1_loss``),
        kept in the state as the readers' choices are."""
        return self._main(slot, key, classify(key).rank)

    def _main(self, slot: str, name: str, rank: int) -> bool:
        held = self.mains.get(slot)
        if held is None or held[0] == name:
            self.mains[slot] = (name, rank)
            return True
        if rank < held[1]:
            self.mains[slot] = (name, rank)
            self.version += 1
            return True
        return False

    def _named(self, key: str, name: str) -> str:
        if self.names.get(key) != name:
            self.names[key] = name
        return key

    def state_dict(self) -> dict[str, Any]:
        """The main series chosen: a restarted daemon keeps them, whatever tag it reads
        first (the last values are the trainer's to give again)."""
        return {"mains": {k: list(v) for k, v in self.mains.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for slot, (name, rank) in state.get("mains", {}).items():
            self.mains.setdefault(slot, (str(name), int(rank)))

    def observe(self, entry: Mapping[str, Any]) -> None:
        """Note an entry's values (its keys are record keys, or a JSONL record's own)."""
        self.last.update(entry)

    def roles(self) -> dict[str, Series]:
        """Record key -> its series (by the name the run wrote), every key seen."""
        stamp = (len(self.last), len(self.names), self.version)
        if self._roles[0] == stamp:  # the same keys and names as last time
            return self._roles[1]
        out: dict[str, Series] = {}
        for key in list(self.last):  # a copy: /metrics reads from its own thread
            name = self.names.get(key, key)
            series = classify(name)
            if key in _KEY_ROLES:  # a main slot: its role is the slot's, whatever the name
                role, split = _KEY_ROLES[key]
                series = Series(name, role, split, series.direction, series.rank, series.core)
            out[key] = series
        self._roles = (stamp, out)
        return out

    @property
    def has_loss(self) -> bool:
        return any(s.role == "loss" for s in self.roles().values())

    def watching(self) -> dict[str, str]:
        """The ``Watching series`` fields: each role's series, and the ones ignored."""
        groups: dict[str, list[str]] = {}
        for key, series in self.roles().items():
            if series.role == "step" or not _numeric(self.last[key]):
                continue  # the step, or text (a prediction example's answers)
            label = _label(key, series)
            groups.setdefault(label, []).append(series.name + ("(main)" if key in self.mains
                                                               or key in _KEY_ROLES else ""))
        return {label: ",".join(names) for label, names in sorted(groups.items())}

    def hint(self) -> tuple[list[str], str]:
        """The names seen, and the ``[records] aliases`` entry that would name a loss."""
        roles = self.roles()
        seen = [s.name for k, s in roles.items() if s.role != "step" and _numeric(self.last[k])]
        guesses = [s.name for k, s in roles.items()
                   if s.role not in ("step", "summary") and _numeric(self.last[k])]  # fmt: skip
        guess = guesses[0] if guesses else "<your loss tag>"
        return seen, f'[records] aliases = {{ "{guess}" = "loss" }}'

    def values(self) -> list[tuple[str, str, float]]:
        """(series name, role, last value) of every numeric series, for ``/metrics`` and
        the report."""
        out = []
        for key, series in sorted(self.roles().items()):
            value = self.last.get(key)  # a key is never removed: there while listed
            if series.role == "step" or not _numeric(value):
                continue
            out.append((series.name, _label(key, series), float(value)))
        return out



_KEY_ROLES: dict[str, tuple[Role, Split]] = {
    "loss": ("loss", "train"), "eval_loss": ("loss", "eval"),
    "learning_rate": ("learning_rate", "train"), "grad_norm": ("grad_norm", "train"),
    "eval_accuracy": ("metric", "eval"), "accuracy": ("metric", "eval"),
    "step": ("step", "train"),
}


def _numeric(value: Any) -> TypeGuard[float | int]:
    """A number a series can hold (not a bool, not a prediction example's text)."""
    return isinstance(value, float | int) and not isinstance(value, bool)


def _label(key: str, series: Series) -> str:
    """``train_loss``, ``eval_loss``, ``learning_rate``, ``metric_higher``, ``ignored``."""
    if series.role == "loss":
        return f"{series.split}_loss"
    if series.role == "metric":
        return f"{series.split}_metric_{series.direction}"
    if series.role in ("learning_rate", "grad_norm"):
        return series.role
    return "ignored"

