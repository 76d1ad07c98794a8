"""The optional checkpoint scan: the pure scorer, the engine path (replay and the live
daemon), and the promise that the daemon never imports torch."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from live_daemon import live_daemon
from live_harness import log_text, snapshots, terminate, wait_until
from safetensors.numpy import save_file

from smart_monitor.config import CheckpointScanConfig, load_config
from smart_monitor.forensics.scan import WeightScan
from smart_monitor.outputs.log import make_logger
from smart_monitor.runtime.replay import replay
from smart_monitor.triggers import Severity

SCAN_ON = "[checkpoint_scan]\nenabled = true\n"


def norms(n: int, start: float = 50.0, growth: float = 0.01, seed: int = 0) -> list[float]:
    """A global weight norm that drifts up by about ``growth`` per checkpoint."""
    rng = random.Random(seed)
    out = [start]
    for _ in range(n - 1):
        out.append(out[-1] * (1 + growth * rng.uniform(0.8, 1.2)))
    return out


def test_steady_drift_never_fires_and_a_jump_does() -> None:
    d = WeightScan(CheckpointScanConfig())
    series = norms(30)
    for i, n in enumerate(series):
        assert d.update((i + 1) * 100, n, 0) == [], i
    fired = d.update(3100, series[-1] * 1.5, 0)
    assert [t.kind for t in fired] == ["weight_norm_zscore"]
    assert fired[0].severity is Severity.CRITICAL and fired[0].details["z"] > 10
    assert fired[0].name == f"weight_norm_zscore_{fired[0].details['z']:.2f}"
    # The jump stays out of the baseline; the next change is measured from the new norm.
    assert d.update(3200, series[-1] * 1.5 * 1.01, 0) == []


def test_nothing_fires_during_warmup_and_nonfinite_always_does() -> None:
    d = WeightScan(CheckpointScanConfig(warmup=3))
    assert d.update(100, 10.0, 0) == []
    assert d.update(200, 100.0, 0) == []  # x10, but no baseline yet
    fired = d.update(300, 100.0, 2)
    assert [(t.name, t.severity) for t in fired] == [("weights_nonfinite", Severity.CRITICAL)]
    assert fired[0].details["tensors"] == 2


def test_a_checkpoint_seen_again_is_not_scored_twice() -> None:
    """A restarted daemon finds every checkpoint again and re-scans it."""
    d = WeightScan(CheckpointScanConfig(warmup=2))
    for i, n in enumerate(norms(6)):
        d.update((i + 1) * 100, n, 0)
    assert d.update(300, 1000.0, 5) == []


@pytest.mark.parametrize("seed", range(5))
def test_resume_from_json_state_gives_the_same_triggers(seed: int) -> None:
    rng = random.Random(seed)
    series = norms(40, seed=seed)
    jumps = rng.sample(range(10, 40), 3)
    for j in jumps:
        series[j:] = [v * 1.3 for v in series[j:]]
    points = [((i + 1) * 100, n, int(i == jumps[0])) for i, n in enumerate(series)]
    cfg = CheckpointScanConfig()

    def fired(d: WeightScan, pts: list[tuple[int, float, int]]) -> list[tuple[str, int, str]]:
        return [(t.name, t.step, t.severity.value) for p in pts for t in d.update(*p)]

    expected = fired(WeightScan(cfg), points)
    cut = rng.randrange(1, len(points))
    first = WeightScan(cfg)
    got = fired(first, points[:cut])
    second = WeightScan(cfg)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += fired(second, points[cut:])
    assert got == expected
    assert {name.rstrip("-.0123456789") for name, _, _ in expected} == {
        "weight_norm_zscore_", "weights_nonfinite"
    }


def weights(norm: float, nan: bool = False) -> dict[str, np.ndarray]:
    """Two layers whose global L2 norm (of finite values) is ``norm``; with ``nan``
    a bias of NaNs, which leaves that norm as it is."""
    w = np.full((10, 10), norm / 10 / np.sqrt(2), dtype=np.float32)
    bias = np.full(4, np.nan if nan else 0.0, dtype=np.float32)
    return {"model.layers.0.w": w, "model.layers.1.w": w.copy(), "model.layers.1.b": bias}


def hf_run(run: Path, series: list[float], nan_at: int | None = None) -> None:
    """Checkpoint folders every 100 steps (weights first, marker last) and metrics."""
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "metrics.jsonl", "w") as fh:
        for i, n in enumerate(series):
            step = (i + 1) * 100
            ck = run / f"checkpoint-{step}"
            ck.mkdir()
            save_file(weights(n, nan=step == nan_at), str(ck / "model.safetensors"))
            (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
            fh.write(json.dumps({"step": step, "loss": 1.0, "learning_rate": 1e-4}) + "\n")


def test_replay_snapshots_the_jump_and_the_nan_checkpoint(tmp_path: Path) -> None:
    series = norms(12)
    series[8:] = [v * 2 for v in series[8:]]  # the norm doubles at checkpoint-900
    run, out = tmp_path / "run", tmp_path / "out"
    hf_run(run, series, nan_at=1100)
    (tmp_path / "c.toml").write_text(SCAN_ON)
    config = load_config(
        tmp_path / "c.toml", metrics_file=run / "metrics.jsonl", checkpoint_dir=run,
        snapshot_dir=out / "snapshots", log_dir=out / "logs", state_dir=out / "state",
    )
    log, daily = make_logger(config.log_dir, stderr=None)
    engine = replay(config, run / "metrics.jsonl", log)
    if daily is not None:
        daily.close()
    assert engine.counts["scans"] == 12 and engine.counts["scan_failures"] == 0

    by_step = {m["step"]: m for m in snapshots(out)}
    jump = by_step[900]
    assert [str(t).split("_")[:3] for t in jump["triggers"]] == [["weight", "norm", "zscore"]]
    assert jump["checkpoint"]["name"] == "checkpoint-900"
    assert jump["metrics"]["global_norm"] == pytest.approx(series[8], rel=1e-5)
    nan = by_step[1100]
    assert nan["triggers"] == ["weights_nonfinite"] and nan["severity"] == "critical"
    assert nan["metrics"]["nonfinite_tensors"] == [
        {"name": "model.layers.1.b", "dtype": "F32", "shape": [4], "nan": 4, "inf": 0}
    ]
    text = log_text(out)
    assert "Checkpoint scanned name=checkpoint-1100 step=1100" in text
    assert "Detected anomaly step=1100 trigger=weights_nonfinite severity=critical" in text


def test_scan_is_off_by_default_and_a_failed_scan_is_not_fatal(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    hf_run(run, norms(3))
    (run / "checkpoint-300" / "model.safetensors").write_bytes(b"\x00" * 4)  # cut short
    base = {"metrics_file": run / "metrics.jsonl", "checkpoint_dir": run,
            "snapshot_dir": out / "snapshots", "log_dir": out / "logs", "state_dir": out / "st"}
    log, _ = make_logger(None, stderr=None)
    assert replay(load_config(None, **base), run / "metrics.jsonl", log).counts["scans"] == 0

    (tmp_path / "c.toml").write_text(SCAN_ON)
    log, daily = make_logger(out / "logs", stderr=None)
    engine = replay(load_config(tmp_path / "c.toml", **base), run / "metrics.jsonl", log)
    assert daily is not None
    daily.close()
    assert (engine.counts["scans"], engine.counts["scan_failures"]) == (2, 1)
    assert "Checkpoint scan failed name=checkpoint-300" in log_text(out)


def test_live_daemon_scans_off_its_loop_and_snapshots_nan_weights(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(SCAN_ON)
    with live_daemon(run, out, "--config", str(config)) as proc:
        hf_run(run, norms(4), nan_at=400)
        wait_until(lambda: "triggers=weights_nonfinite" in log_text(out), "the NaN snapshot", 30)
        assert terminate(proc) == 0
    (meta,) = [m for m in snapshots(out) if m["triggers"] == ["weights_nonfinite"]]
    assert meta["step"] == 400 and meta["checkpoint"]["name"] == "checkpoint-400"
    state = json.loads((out / "state" / "state.json").read_text())["data"]["engine"]
    assert state["checkpoint_scan"]["last"][0] == 400  # the scorer resumes where it stopped


_NO_TORCH = """
import sys
from pathlib import Path
import smart_monitor.cli, smart_monitor.runtime.daemon, smart_monitor.runtime.engine
from smart_monitor.forensics.scan import CheckpointScanner
from smart_monitor.config import CheckpointScanConfig
from smart_monitor.sources.checkpoints import Checkpoint
s = CheckpointScanner(CheckpointScanConfig(enabled=True))
s.submit(Checkpoint("checkpoint-1", 1, Path(sys.argv[1])))
(result,) = s.collect(wait=True)
s.close()
assert result.inspection is not None and result.inspection.parameters == 204, result
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "safetensors")))
"""


def test_the_daemon_side_never_imports_torch(tmp_path: Path) -> None:
    ck = tmp_path / "checkpoint-1"
    ck.mkdir()
    save_file(weights(3.0), str(ck / "model.safetensors"))
    out = subprocess.run([sys.executable, "-c", _NO_TORCH, str(ck)], capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
