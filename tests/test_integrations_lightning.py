"""A real Lightning ``Trainer`` on the CPU, writing its metrics with
``MetricsCallback``, while the real daemon follows it live.

Lightning saves single files named ``epoch=E-step=S.ckpt`` (``checkpoints.pattern``),
keeping two. A callback multiplies the learning rate by 50 at a known step; the daemon
must pin the newest checkpoint before it, which must still load (``weights_only``)
after Lightning deleted its source.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from live_daemon import train_beside_daemon
from live_harness import snapshots

pytestmark = pytest.mark.slow

SAVE_STEPS = 50
MAX_STEPS = 300
# Lightning writes a .ckpt in place, so the daemon counts one as complete only once its
# size has settled (settle_seconds, seen by a rescan): the break comes 45 paced steps
# (> 1 s) after the save of step 150, and the rotation that deletes that file 55 later.
BREAK_AT = 193  # the lr used from this step on is x50; first logged at step 195
LOG_EVERY = 5
STEP_SECONDS = 0.025
CONFIG = """\
[checkpoints]
pattern = "epoch={epoch}-step={step}.ckpt"
settle_seconds = 0.2
[watch]
reconcile_seconds = 0.2
"""


def train_lightning(run: Path, extra_callbacks: Sequence[Any] = (), **trainer_args: Any) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from smart_monitor.integrations.lightning import MetricsCallback

    class Regression(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)
            )

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.net(x), y)
            self.log("progress", float(self.global_step))  # ModelCheckpoint keeps the newest
            self.log("train_loss", loss)  # for a logger (TensorBoard, CSV) to write
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    class BreakLearningRate(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step == BREAK_AT - 1:
                for group in trainer.optimizers[0].param_groups:
                    group["lr"] *= 50

        def on_train_batch_end(self, *args: Any) -> None:
            time.sleep(STEP_SECONDS)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 8, generator=gen)
    y = x.sum(dim=1, keepdim=True)
    data = torch.utils.data.TensorDataset(x, y)
    train = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=gen)
    val = torch.utils.data.DataLoader(data, batch_size=128)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**{
        "max_steps": MAX_STEPS, "accelerator": "cpu", "devices": 1, "logger": False,
        "enable_progress_bar": False, "enable_model_summary": False,
        "log_every_n_steps": LOG_EVERY, "val_check_interval": 100,
        "check_val_every_n_epoch": None, "num_sanity_val_steps": 0,
        "callbacks": [
            ModelCheckpoint(dirpath=run, every_n_train_steps=SAVE_STEPS, save_top_k=2,
                            monitor="progress", mode="max"),
            MetricsCallback(run / "metrics.jsonl"),
            BreakLearningRate(),
            *extra_callbacks,
        ],
        **trainer_args,
    })
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(Regression(), train, val)
    finally:
        torch.set_num_threads(threads)


def test_live_daemon_pins_lightning_checkpoint(tmp_path: Path) -> None:
    import torch

    run, out = tmp_path / "run", tmp_path / "out"
    config = tmp_path / "smart_monitor.toml"
    config.write_text(CONFIG)
    records, break_step = train_beside_daemon(run, out, train_lightning, "--config", str(config))
    train = [r for r in records if "learning_rate" in r]

    # What the callback wrote: every logged step with loss, lr and grad norm; val metrics.
    assert [r["step"] for r in train] == list(range(LOG_EVERY, MAX_STEPS + 1, LOG_EVERY))
    before = [r for r in train if r["step"] < break_step]
    assert all(r["grad_norm"] > 0 and math.isfinite(r["loss"]) for r in before)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [100, 200, 300]

    assert break_step % SAVE_STEPS
    kept = break_step // SAVE_STEPS * SAVE_STEPS
    (meta,) = [m for m in snapshots(out) if m["step"] == break_step]
    snap = meta["_path"]
    assert any(t.startswith("lr_zscore_") for t in meta["triggers"])
    name = meta["checkpoint"]["name"]
    assert name.endswith(f"-step={kept}.ckpt")
    assert not (run / name).exists()  # rotated away by ModelCheckpoint(save_top_k=2)
    ckpt = torch.load(snap / "model" / name, weights_only=True)
    assert ckpt["global_step"] == kept and "net.0.weight" in ckpt["state_dict"]
    assert meta["metrics"] == {r["step"]: r for r in train}[break_step]


def test_gradient_accumulation_writes_each_step_once(tmp_path: Path) -> None:
    train_lightning(tmp_path, max_steps=20, accumulate_grad_batches=2)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 15, 20]
    assert all(r["grad_norm"] > 0 and r["learning_rate"] == 1e-3 for r in records)
