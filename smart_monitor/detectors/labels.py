"""Data quality: the same prompt seen with different golden answers."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

from smart_monitor.config import ConflictingLabelsConfig
from smart_monitor.detectors.base import NotesTrainSteps
from smart_monitor.notes import Note
from smart_monitor.records import Record, normalise_text
from smart_monitor.triggers import Severity, Trigger

__all__ = ["ConflictingLabels"]


_SHOWN = 200  # characters of an answer kept to name it in a trigger
_MAX_ANSWERS = 16  # distinct answers remembered per prompt


def _hash(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).hexdigest()


class ConflictingLabels(NotesTrainSteps):
    """Fires when a prompt comes back with a golden answer it has not had before
    (answers compared whitespace- and case-normalised): two labels for one input, which
    no model can learn. Remembers the ``max_prompts`` most recent prompts by a 64-bit
    hash, never their text, and each one's answers by hash plus their first
    characters, so memory and the saved state stay small when prompts are 20 KB
    (FAULTS.md #45); both answers go into the trigger (and so the metadata).

    >>> from smart_monitor.records import ExampleRecord
    >>> d = ConflictingLabels(ConflictingLabelsConfig())
    >>> d.update(ExampleRecord(10, "2+2?", "4", "4", True, 0.1, {}))
    []
    >>> t = d.update(ExampleRecord(20, "2+2?", "5", "4", False, 0.1, {}))[0]
    >>> t.name, t.details["answers"], t.details["first_step"]
    ('conflicting_labels', ['4', '5'], 10)
    """

    kind = "conflicting_labels"

    def __init__(self, config: ConflictingLabelsConfig) -> None:
        self.config = config
        self.notes: list[Note] = []  # this detector says nothing but triggers
        self.last_z: float | None = None  # no z-score
        # prompt hash -> (step first seen, [[normalised answer hash, its first chars]])
        self.prompts: OrderedDict[str, tuple[int, list[list[str]]]] = OrderedDict()
        self.last_step = 0

    def update(self, record: Record) -> list[Trigger]:
        found = self.example(record)
        if found is None:
            return []
        record, step = found
        key = _hash(record.prompt)
        answer = [_hash(normalise_text(record.golden_answer)), record.golden_answer[:_SHOWN]]
        seen = self.prompts.get(key)
        if seen is None:
            self.prompts[key] = (step, [answer])
            if len(self.prompts) > self.config.max_prompts:
                self.prompts.popitem(last=False)
            return []
        self.prompts.move_to_end(key)
        first_step, answers = seen
        if any(h == answer[0] for h, _ in answers) or len(answers) >= _MAX_ANSWERS:
            return []
        answers.append(answer)
        details = {
            "prompt": record.prompt[:_SHOWN],
            "answers": [shown for _, shown in answers],
            "first_step": first_step,
        }
        return [Trigger(self.kind, self.kind, Severity.WARNING, step, details)]

    def rewind(self, step: int) -> None:
        """Labels are facts about the data, not about the trainer's state: a resumed
        run re-reads the same data, so nothing learnt is dropped."""
        self.last_step = min(self.last_step, step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "prompt_hashes": [[p, s, [list(x) for x in a]] for p, (s, a) in self.prompts.items()],
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Reads the older ``prompts`` (full text) too, hashing it as it comes."""
        self.prompts = OrderedDict(
            (str(p), (int(s), [[str(h), str(shown)] for h, shown in a]))
            for p, s, a in state.get("prompt_hashes", [])
        )
        for prompt, s, answers in state.get("prompts", []):
            old = [[_hash(normalise_text(str(a))), str(a)[:_SHOWN]] for a in answers]
            self.prompts[_hash(str(prompt))] = (int(s), old)
        self.last_step = int(state.get("last_step", 0))
