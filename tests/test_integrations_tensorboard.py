"""Real trainers that know nothing of the monitor: HF ``Trainer`` with
``report_to=["tensorboard"]``, Lightning with its default TensorBoard logger and with
``CSVLogger``, each followed live by ``smart-monitor run --metrics <the run folder>``.

The tiny models and the injected learning-rate break (x50) are those of
test_integrations_hf and test_integrations_lightning. What the trainer wrote is read
back with tensorboard's own loader (or the csv module): the daemon must snapshot the
step of the break with the newest checkpoint before it, pinned before rotation.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from live_daemon import live_daemon
from live_harness import log_text, snapshots, terminate, wait_until
from test_integrations_hf import SAVE_STEPS as HF_SAVE_STEPS
from test_integrations_hf import train_gpt2
from test_integrations_lightning import CONFIG as LIGHTNING_CONFIG
from test_integrations_lightning import SAVE_STEPS as PL_SAVE_STEPS
from test_integrations_lightning import train_lightning

pytestmark = pytest.mark.slow


def tensorboard_scalars(root: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value, from every event file below ``root`` (tensorboard's loader)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.util import tensor_util

    out: dict[str, dict[int, float]] = {}
    files = sorted(root.rglob("events.out.tfevents.*"))
    assert files, f"no event file below {root}"
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    value = float(tensor_util.make_ndarray(v.tensor).reshape(()))
                    out.setdefault(v.tag, {})[event.step] = value
    return out


def csv_scalars(root: Path) -> dict[str, dict[int, float]]:
    (path,) = root.rglob("metrics.csv")
    out: dict[str, dict[int, float]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for name, cell in row.items():
                if cell and name != "step":
                    out.setdefault(name, {})[int(row["step"])] = float(cell)
    return out


def follow(
    run: Path,
    out: Path,
    train: Callable[[Path], None],
    read: Callable[[Path], dict[str, dict[int, float]]],
    lr_tag: str,
    *extra: str,
) -> tuple[dict[str, dict[int, float]], int]:
    """Train beside ``smart-monitor run --metrics run``; the scalars written and the
    first step whose learning rate is x10 the first, once its snapshot is logged."""
    run.mkdir()
    with live_daemon(run, out, *extra, metrics=run) as proc:
        train(run)
        scalars = read(run)
        lrs = sorted(scalars[lr_tag].items())
        break_step = next(step for step, lr in lrs if lr > 10 * lrs[0][1])
        logged = f"Created snapshot step={break_step} "
        wait_until(lambda: logged in log_text(out), "the snapshot of the break", 60)
        assert terminate(proc) == 0
    assert "Traceback" not in log_text(out)
    return scalars, break_step


def snapshot_of(out: Path, step: int) -> dict[str, Any]:
    (meta,) = [m for m in snapshots(out) if m["step"] == step]
    assert any(t.startswith("lr_zscore_") for t in meta["triggers"]), meta["triggers"]
    return meta


def test_hf_trainer_tensorboard_followed_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, out = tmp_path / "run", tmp_path / "out"
    train = functools.partial(train_gpt2, report_to="tensorboard")
    scalars, break_step = follow(run, out, train, tensorboard_scalars, "train/learning_rate")

    assert break_step % HF_SAVE_STEPS
    kept = break_step // HF_SAVE_STEPS * HF_SAVE_STEPS
    meta = snapshot_of(out, break_step)
    assert meta["checkpoint"]["name"] == f"checkpoint-{kept}"
    assert not (run / f"checkpoint-{kept}").exists()  # rotated away: the pin held it
    assert "transformer.h.1.mlp.c_fc.weight" in load_file(meta["_path"] / "model" /
                                                          "model.safetensors")
    # the record is the trainer's scalars of that step, under the JSONL's keys
    m = meta["metrics"]
    assert m["learning_rate"] == scalars["train/learning_rate"][break_step]
    assert m["loss"] == scalars["train/loss"][break_step]
    assert m["grad_norm"] == scalars["train/grad_norm"][break_step]
    assert meta["lr_history"][-1] == [break_step, m["learning_rate"]]


def _lightning_run(
    tmp_path: Path, logger: Any, read: Callable[[Path], dict[str, dict[int, float]]]
) -> str:
    """The run followed live; the daemon's log."""
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor

    run, out = tmp_path / "run", tmp_path / "out"
    config = tmp_path / "smart_monitor.toml"
    config.write_text(LIGHTNING_CONFIG)

    def train(run: Path) -> None:
        chosen = logger(run) if callable(logger) else logger
        train_lightning(
            run, [LearningRateMonitor(logging_interval="step")], logger=chosen,
            default_root_dir=run,  # where the default logger writes
        )

    scalars, break_step = follow(run, out, train, read, "lr-Adam", "--config", str(config))
    assert break_step % PL_SAVE_STEPS
    kept = break_step // PL_SAVE_STEPS * PL_SAVE_STEPS
    meta = snapshot_of(out, break_step)
    name = meta["checkpoint"]["name"]
    assert name.endswith(f"-step={kept}.ckpt")
    assert not (run / name).exists()
    ckpt = torch.load(meta["_path"] / "model" / name, weights_only=True)
    assert ckpt["global_step"] == kept
    assert meta["metrics"]["learning_rate"] == scalars["lr-Adam"][break_step]
    steps = [s for s, _ in meta["loss_history"]]
    assert steps == sorted(steps) and all(s in scalars["train_loss"] for s in steps)
    return log_text(out)


def test_lightning_default_tensorboard_logger_followed_live(tmp_path: Path) -> None:
    _lightning_run(tmp_path, True, tensorboard_scalars)  # logger=True: TensorBoardLogger


def test_lightning_csv_logger_followed_live(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    log = _lightning_run(tmp_path, lambda run: CSVLogger(run), csv_scalars)
    # lr-Adam, then val_loss: columns the header lacked, so the file was rewritten
    assert "Metrics file rewritten" in log
