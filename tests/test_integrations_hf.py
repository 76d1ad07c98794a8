"""A real HF ``Trainer`` on the CPU (a tiny GPT-2 built from a config, no download),
writing its metrics with ``MetricsCallback``, while the real daemon follows it live.

A callback multiplies the learning rate by 50 at a known step. The daemon must
snapshot the newest checkpoint before that step, pinned before ``save_total_limit=2``
rotates it away, and the snapshot's ``model.safetensors`` must still load afterwards.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from live_daemon import train_beside_daemon
from live_harness import SMART_MONITOR, log_text, snapshots

pytestmark = pytest.mark.slow

SAVE_STEPS = 50
MAX_STEPS = 300
BREAK_AFTER = 152  # lr x50 from the step after this one; first logged at step 155
STEP_SECONDS = 0.01  # the tiny model trains at ~170 steps/s: pace it like a real job


def train_gpt2(run: Path, report_to: str = "none") -> None:
    import torch
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from smart_monitor.integrations.transformers import MetricsCallback

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=2,
                                       n_head=2))
    tokens = torch.randint(0, 100, (256, 16), generator=torch.Generator().manual_seed(0))

    class Tokens(torch.utils.data.Dataset[dict[str, Any]]):
        def __len__(self) -> int:
            return len(tokens)

        def __getitem__(self, i: int) -> dict[str, Any]:
            return {"input_ids": tokens[i], "labels": tokens[i]}

    class BreakLearningRate(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == BREAK_AFTER:
                sched = kw["lr_scheduler"]
                sched.base_lrs = [lr * 50 for lr in sched.base_lrs]

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            time.sleep(STEP_SECONDS)

    args = TrainingArguments(
        output_dir=str(run), max_steps=MAX_STEPS, per_device_train_batch_size=8,
        learning_rate=1e-3, lr_scheduler_type="constant", logging_steps=5,
        save_steps=SAVE_STEPS, save_total_limit=2, report_to=report_to, use_cpu=True,
        disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(model=model, args=args, train_dataset=Tokens(),
                callbacks=[MetricsCallback(run / "metrics.jsonl"), BreakLearningRate()]).train()
    finally:
        torch.set_num_threads(threads)


def test_live_daemon_pins_checkpoint_before_lr_break(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the model is built from a config

    run, out = tmp_path / "run", tmp_path / "out"
    records, break_step = train_beside_daemon(run, out, train_gpt2)
    train = [r for r in records if "learning_rate" in r]

    assert break_step % SAVE_STEPS, "the break must not fall on a save step (a race)"
    kept = break_step // SAVE_STEPS * SAVE_STEPS

    (m,) = [m for m in snapshots(out) if m["step"] == break_step]
    snap = m["_path"]
    assert any(t.startswith("lr_zscore_") for t in m["triggers"])
    assert m["checkpoint"]["name"] == f"checkpoint-{kept}"

    # The trainer rotated the source away; the snapshot's weights still load.
    assert not (run / f"checkpoint-{kept}").exists()
    weights = load_file(snap / "model" / "model.safetensors")
    assert "transformer.h.1.mlp.c_fc.weight" in weights
    inspected = subprocess.run(
        [str(SMART_MONITOR), "inspect", str(snap), "--json", "--against",
         str(run / f"checkpoint-{MAX_STEPS}")],
        capture_output=True, text=True, timeout=60, check=True,
    )
    report = json.loads(inspected.stdout)
    assert report["parameters"] == sum(w.numel() for w in weights.values())
    assert report["nonfinite"] == []
    assert report["against"]["changes"][0]["relative"] > 0.5  # lr x50 moved the weights

    # The metadata holds the trainer's real records.
    by_step = {r["step"]: r for r in train}
    assert m["metrics"] == by_step[break_step]
    assert m["lr_history"][-1] == [break_step, by_step[break_step]["learning_rate"]]
    for step, loss in m["loss_history"]:
        assert by_step[step]["loss"] == loss
    assert "Traceback" not in log_text(out)
