"""HF Transformers: append every ``on_log`` record, with its step, to the JSONL file.

Usage::

    from smart_monitor.integrations.transformers import MetricsCallback
    trainer = Trainer(..., callbacks=[MetricsCallback("runs/x/metrics.jsonl")])

HF filters a NaN step loss out of ``loss`` by default (``logging_nan_inf_filter``) but
logs ``grad_norm`` unfiltered: both are written as they come, NaN as a bare token.
Only the main process writes (``state.is_world_process_zero``).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from smart_monitor.integrations.writer import MetricsWriter

__all__ = ["MetricsCallback"]


class MetricsCallback(TrainerCallback):
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.writer = MetricsWriter(path, rank=0)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if logs and state.is_world_process_zero:
            self.writer.log(state.global_step, **logs)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.writer.close()
