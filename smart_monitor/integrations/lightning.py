"""Lightning: train loss, learning rate and grad norm per logged step, and validation
metrics, appended to the JSONL file the daemon follows.

Usage::

    from smart_monitor.integrations.lightning import MetricsCallback
    trainer = L.Trainer(..., callbacks=[MetricsCallback("runs/x/metrics.jsonl")])

A record is written every ``trainer.log_every_n_steps`` optimizer steps (or
``every_n_steps``). Validation metrics whose name starts with ``val`` are written after
each validation run, ``val_loss`` as ``eval_loss`` and ``val_acc``/``val_accuracy`` as
``eval_accuracy``, the names the daemon reads. Only global rank 0 writes.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch

from smart_monitor.integrations.writer import MetricsWriter

__all__ = ["MetricsCallback"]

_EVAL_NAMES = {"val_loss": "eval_loss", "val_acc": "eval_accuracy", "val_accuracy": "eval_accuracy"}


class MetricsCallback(pl.Callback):
    def __init__(self, path: str | os.PathLike[str], every_n_steps: int | None = None) -> None:
        self.writer = MetricsWriter(path, rank=0)
        self.every_n_steps = every_n_steps
        self._grad_norm: float | None = None
        self._last_step = -1

    def _every(self, trainer: pl.Trainer) -> int:
        # set by Lightning's logger connector at run time; 0 with barebones=True
        return max(1, self.every_n_steps or getattr(trainer, "log_every_n_steps", 0) or 50)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """The grad norm, computed only for the steps that will be written."""
        self._grad_norm = None
        if (trainer.global_step + 1) % self._every(trainer):
            return
        grads = [p.grad.detach() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
            self._grad_norm = float(torch.linalg.vector_norm(norms))

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == 0 or step % self._every(trainer):
            return
        if step == self._last_step:  # gradient accumulation: several batches, one step
            return
        self._last_step = step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        record: dict[str, Any] = {"loss": None if loss is None else float(loss)}
        if trainer.optimizers:
            record["learning_rate"] = float(trainer.optimizers[0].param_groups[0]["lr"])
        if self._grad_norm is not None:
            record["grad_norm"] = self._grad_norm
        record["epoch"] = trainer.current_epoch
        self.writer.log(step, **record)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        record = {
            _EVAL_NAMES.get(name, name): float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith("val") and _scalar(value)
        }
        if record:
            self.writer.log(trainer.global_step, **record)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.writer.close()


def _scalar(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError, RuntimeError):
        return False
    return True

