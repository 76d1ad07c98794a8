"""FAULTS.md cases 59, 60 and 62-66 (the third ring's edges): finite extremes, a hole
in an event file, config values at the edge, a stop whose steps fail, a log disk that
fills, thousands of snapshots, and a snapshot rewritten behind ``verify``'s back. Each
runs the real command under the default config, on real logs where a run's shape
matters (../shared/real-runs/dev)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from live_harness import SMART_MONITOR, log_text, snapshots

DEV = Path(__file__).parents[1].parent / "shared" / "real-runs" / "dev"
LSTM = DEV / "pypi-data__pypi-mirror-359__nlpia2_LSTM_2l_12ep.jsonl"


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def replay(metrics: Path, out: Path) -> str:
    res = subprocess.run(
        [str(SMART_MONITOR), "replay", "--metrics", str(metrics), "--output", str(out),
         "--no-plots"],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "Warning" not in res.stderr, res.stderr
    return log_text(out)


def events(log: str, text: str) -> list[str]:
    return [x for x in log.splitlines() if f" {text} " in x]


def write_events(folder: Path, recs: list[dict[str, Any]]) -> Path:
    """``recs`` as one event file, as HF's TensorBoard callback names the keys."""
    from torch.utils.tensorboard import SummaryWriter

    tags = {"loss": "train/loss", "learning_rate": "train/learning_rate",
            "grad_norm": "train/grad_norm", "epoch": "train/epoch", "eval_loss": "eval/loss"}
    w = SummaryWriter(str(folder))
    for r in recs:
        for key, value in r.items():
            if key != "step" and isinstance(value, float | int):
                w.add_scalar(tags.get(key, key), value, r["step"])
    w.close()
    (path,) = folder.glob("events.out.tfevents.*")
    return path


def record_offsets(data: bytes) -> list[int]:
    """Where each record of an event file starts (length, CRC, data, CRC)."""
    at, out = 0, []
    while at < len(data):
        out.append(at)
        at += 16 + int.from_bytes(data[at:at + 8], "little")
    return out


def test_fault_60_bad_crc_resyncs_and_a_later_nan_is_caught(tmp_path: Path) -> None:
    """A bit flip in one record and a NUL hole in another, both before a NaN loss: each
    hole is counted once, the records after it are read, and the NaN is detected."""
    recs = [r for r in records(LSTM) if "loss" in r]
    nan_step = recs[len(recs) * 3 // 4]["step"]
    for r in recs:
        if r["step"] == nan_step:
            r["loss"] = float("nan")
    path = write_events(tmp_path / "run", recs)
    data = bytearray(path.read_bytes())
    starts = record_offsets(bytes(data))
    flip, hole = starts[len(starts) // 4], starts[len(starts) // 2]
    data[flip + 20] ^= 0xFF  # a bit flip in one record's data
    data[hole:starts[starts.index(hole) + 3]] = bytes(starts[starts.index(hole) + 3] - hole)
    path.write_bytes(bytes(data))
    log = replay(tmp_path / "run", tmp_path / "out")
    bad = events(log, "Skipped malformed line")
    assert len(bad) == 2 and all("reason=crc_mismatch" in x for x in bad), log
    assert f"offset={flip}" in bad[0] and f"offset={hole}" in bad[1]
    (nan,) = [x for x in events(log, "Detected anomaly") if "loss_nonfinite" in x]
    assert f"step={nan_step} " in nan
    (snap,) = [m for m in snapshots(tmp_path / "out") if m["triggers"] == ["loss_nonfinite"]]
    assert snap["step"] == nan_step
