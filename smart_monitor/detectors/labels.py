"""Data quality: the same prompt seen with different golden answers."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from smart_monitor.config import ConflictingLabelsConfig
from smart_monitor.detectors.base import NotesTrainSteps
from smart_monitor.records import Record
from smart_monitor.triggers import Severity, Trigger

__all__ = ["ConflictingLabels"]


def _normalise(text: str) -> str:
    return " ".join(text.split()).casefold()


class ConflictingLabels(NotesTrainSteps):
    """Fires when a prompt comes back with a golden answer it has not had before
    (answers compared whitespace- and case-normalised): two labels for one input, which
    no model can learn. Remembers the ``max_prompts`` most recent prompts, so memory is
    bounded on a long run; both answers go into the trigger (and so the metadata).

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
        # prompt -> (step first seen, [golden answers as first written, in order])
        self.prompts: OrderedDict[str, tuple[int, list[str]]] = OrderedDict()
        self.last_step = 0

    def update(self, record: Record) -> list[Trigger]:
        found = self.example(record)
        if found is None:
            return []
        record, step = found
        seen = self.prompts.get(record.prompt)
        if seen is None:
            self.prompts[record.prompt] = (step, [record.golden_answer])
            if len(self.prompts) > self.config.max_prompts:
                self.prompts.popitem(last=False)
            return []
        self.prompts.move_to_end(record.prompt)
        first_step, answers = seen
        golden = _normalise(record.golden_answer)
        if any(_normalise(a) == golden for a in answers):
            return []
        answers.append(record.golden_answer)
        details = {
            "prompt": record.prompt,
            "answers": list(answers),
            "first_step": first_step,
        }
        return [Trigger(self.kind, self.kind, Severity.WARNING, step, details)]

    def rewind(self, step: int) -> None:
        """Labels are facts about the data, not about the trainer's state: a resumed
        run re-reads the same data, so nothing learnt is dropped."""
        self.last_step = min(self.last_step, step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "prompts": [[p, s, list(a)] for p, (s, a) in self.prompts.items()],
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts = OrderedDict(
            (str(p), (int(s), [str(x) for x in a])) for p, s, a in state.get("prompts", [])
        )
        self.last_step = int(state.get("last_step", 0))
