"""Every item of ../shared/real-runs/dev-tb/ through the real ``replay`` command (issue 14):
what its README says a good monitor reports that concerns reading and series. The
overfitting and never-learns conclusions are another issue's; here their series are read.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from live_harness import SMART_MONITOR

DEV_TB = Path(__file__).resolve().parents[2] / "shared" / "real-runs" / "dev-tb"
if not DEV_TB.is_dir():
    DEV_TB = Path("/work/shared/real-runs/dev-tb")


KERAS = {"train_loss": "train/epoch_loss", "eval_loss": "validation/epoch_loss"}
YOLO5 = {"train_loss": "train/box_loss", "eval_loss": "val/box_loss", "learning_rate": "x/lr0"}
YOLO8 = {"train_loss": "train/box_loss", "eval_loss": "val/box_loss", "learning_rate": "lr/pg0"}
D2 = {"train_loss": "total_loss", "learning_rate": "lr"}


@dataclass(frozen=True)
class Item:
    mains: dict[str, str]  # Watching series role -> its main series
    also: dict[str, str] = field(default_factory=dict)  # role -> another series in it
    clean: bool = False  # no warning and no critical line at all
    critical: str | None = None  # a critical non-finite trigger, at this step
    warning_only: str | None = None  # a non-finite warning at this step, nothing critical
    # the steps of the `Run restarted` lines, in order (a README's restarts); no item
    # holds a resume that goes back, so `Trainer restarted` is never right here
    restarts: tuple[int, ...] = ()


ITEMS = {
    "T01": Item(KERAS, {"eval_metric_higher": "validation/epoch_accuracy"}),
    "T02": Item(KERAS, {"train_metric_higher": "train/epoch_accuracy"}),
    "T03": Item(KERAS, {"train_metric_lower": "train/epoch_MSE"}, restarts=(0,)),
    "T04": Item(KERAS, clean=True),
    "T05": Item(YOLO5, {"eval_metric_higher": "metrics/mAP_0.5", "train_loss": "train/obj_loss"},
                clean=True),
    "T06": Item(YOLO5, {"eval_loss": "val/cls_loss"}),
    "T07": Item(YOLO8, {"eval_metric_higher": "metrics/mAP50(B)"}, clean=True),
    "T08": Item(YOLO8, {"eval_loss": "val/cls_loss", "ignored": "time"}, critical="6"),
    "T09": Item(YOLO8, critical="325", restarts=(324,)),  # epoch 334 -> 324, time reset
    "T10": Item(YOLO8, warning_only="8"),
    "T11": Item(YOLO8, {"eval_loss": "val/dfl_loss"}),
    "T12": Item({"train_loss": "train_loss_step", "eval_loss": "val_loss",
                 "learning_rate": "lr-Ranger"},
                {"ignored": "train_loss_epoch", "eval_metric_lower": "val_MAE"}),
    "T13": Item({"train_loss": "train_loss_step", "eval_loss": "val_loss"},
                {"ignored": "train_loss_epoch", "eval_metric_lower": "val_RMSE"}),
    "T14": Item({"train_loss": "train/nll_loss", "eval_loss": "val/rmse_loss",
                 "learning_rate": "lr-Adam"}, restarts=(49,)),  # version_1
    # a GAN's losses are not minimised: both watched (non-finite), neither the main one,
    # no loss alarm (the README's word)
    "T15": Item({}, {"train_loss": "generator_loss"}, clean=True),
    "T16": Item({"train_loss": "loss_training", "eval_loss": "loss_validation"}, clean=True),
    # files .3-.6 (step 9 each); .7 starts at 19, after .6's 9: by its steps it goes on,
    # but 19 is where .2 began, so it starts over; .8 (319) and .9 go on
    "T17": Item(D2, {"train_loss": "loss_mask"}, restarts=(9, 9, 9, 9, 19)),
    "T18": Item({"train_loss": "train/loss", "eval_loss": "eval/loss",
                 "grad_norm": "train/grad_norm"}, restarts=(100, 500)),  # files .2, .4
    "T19": Item({"train_loss": "train/loss", "learning_rate": "train/learning_rate"},
                clean=True),
    "T20": Item(D2, {"train_loss": "loss_box_reg"}),
}


def _item_dir(tag: str) -> Path:
    found = sorted(DEV_TB.glob(f"{tag}_*"))
    assert found, f"no {tag} item in {DEV_TB}"
    return found[0]


def _fields(line: str) -> dict[str, list[str]]:
    """``role=a,b(main)`` tokens of a ``Watching series`` line."""
    return {k: v.split(",") for k, v in re.findall(r" ([a-z_]+)=(\S+)", line)}


def test_every_item_has_its_expectations() -> None:
    assert sorted(p.name[:3] for p in DEV_TB.glob("T*_*")) == sorted(ITEMS)


@pytest.mark.parametrize("tag", sorted(ITEMS))
def test_dev_tb_item_is_read_as_written(tag: str, tmp_path: Path) -> None:
    item = ITEMS[tag]
    proc = subprocess.run(
        [SMART_MONITOR, "replay", "--metrics", str(_item_dir(tag)), "--output", str(tmp_path),
         "--no-plots", "--report"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    records = int(re.search(r"replayed (\d+) records", proc.stdout).group(1))  # type: ignore[union-attr]
    assert records > 0
    log = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    watching = [line for line in log.splitlines() if " Watching series " in line]
    assert len(watching) == 1, log
    fields = _fields(watching[0])
    for role, name in item.mains.items():
        assert f"{name}(main)" in fields.get(role, []), (role, name, watching[0])
    for role, name in item.also.items():
        assert name in [n.removesuffix("(main)") for n in fields.get(role, [])], (role, name)
    for name in item.mains.values():  # the report shows every series and its last value
        assert re.search(rf"^{re.escape(name[:40])}\s", proc.stdout, re.M), proc.stdout
    assert "No loss series" not in log
    levels = re.findall(r"^\S+ (warning|critical) (.*)$", log, re.M)
    if item.clean:
        assert levels == [], levels
    nonfinite = re.findall(
        r" (warning|critical) Detected anomaly step=(\d+) trigger=(\S+_nonfinite)", log
    )  # fmt: skip
    if item.critical is not None:
        assert ("critical", item.critical) in [(lv, s) for lv, s, _ in nonfinite], nonfinite
    if item.warning_only is not None:
        assert [(lv, s) for lv, s, _ in nonfinite] == [("warning", item.warning_only)], nonfinite
        assert not [m for lv, m in levels if lv == "critical"], levels
    if item.critical is None and item.warning_only is None:
        assert nonfinite == []
    restarts = re.findall(r" Run restarted step=(\d+) ", log)
    assert tuple(map(int, restarts)) == item.restarts, restarts
    assert " Trainer restarted " not in log


def _records_by_wall_time(item: Path) -> list[tuple[str, bytes]]:
    """Every event record of an item's event files, framed as written, with the file
    it belongs to (relative to the item), in the order the trainer wrote them."""
    from tensorboard.compat.proto import event_pb2

    from smart_monitor.sources.tensorboard import EventFileReader

    found: list[tuple[float, int, str, bytes]] = []
    for path in sorted(item.rglob("events.out.tfevents.*")):
        reader = EventFileReader(str(path))
        at = 0
        for raw in reader.records():
            wall = event_pb2.Event.FromString(raw).wall_time
            found.append((wall, len(found), str(path.relative_to(item)),
                          path.read_bytes()[at:reader.offset]))  # fmt: skip
            at = reader.offset
        reader.close()
    return [(rel, framed) for _, _, rel, framed in sorted(found)]


@pytest.mark.parametrize("tag", ["T04", "T01"])
def test_keras_run_followed_live_as_its_epochs_come(tag: str, tmp_path: Path) -> None:
    """A Keras run written epoch by epoch beside the daemon, as the callback writes it:
    the train folder's file first, the validation folder's an epoch later, and its
    ``evaluation_*_vs_iterations`` tags at iteration steps among the epoch steps. One
    run, never a restart; ``Watching series`` said again when the validation series come."""
    from live_harness import Live, config, wait_until

    records = _records_by_wall_time(_item_dir(tag))
    run = tmp_path / "run"
    run.mkdir()
    live = Live(config(tmp_path, metrics_file=run, source={"quiet_seconds": 0.2}))
    try:
        for n, (rel, framed) in enumerate(records, 1):
            target = run / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "ab") as fh:
                fh.write(framed)
            if n % 4 == 0:  # a few events at a time, read between them
                time.sleep(0.05)
        epochs = 6 if tag == "T04" else 12
        wait_until(lambda: live.log().count("Watching series") >= 2
                   and live.records >= 2 * epochs, "both folders' epochs")  # fmt: skip
    finally:
        live.stop()
    log = live.log()
    assert " Run restarted " not in log and " Trainer restarted " not in log, log
    watching = [_fields(line) for line in log.splitlines() if " Watching series " in line]
    assert len(watching) == 2, watching
    assert "train/epoch_loss(main)" in watching[0]["train_loss"] and "eval_loss" not in watching[0]
    assert "validation/epoch_loss(main)" in watching[1]["eval_loss"]
    assert "evaluation_loss_vs_iterations" in watching[1]["ignored"]
    if tag == "T04":  # the clean control: nothing to say
        assert not re.findall(r"^\S+ (warning|critical) ", log, re.M), log
