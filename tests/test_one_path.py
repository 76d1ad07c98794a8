"""``run`` and ``replay`` take one ingestion path: the daemon, started on a finished
file, writes the very log lines and snapshot metadata that ``replay`` writes for it,
to the last bit of every z-score (both read the file in the same blocks)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from live_harness import Live, config, log_text, snapshots
from synthetic import Anomaly, RunSpec, simulate

from smart_monitor.outputs.log import make_logger
from smart_monitor.runtime.replay import replay

# not shared; ``Watching series``: run says it once the first records are in, replay at
# the end, when every series is known
_OWN = re.compile(
    r" (Started|Stopped|Opened metrics file|Plots not drawn|Snapshot mode|Watching series) "
)


def events(out: Path) -> list[str]:
    """The log lines less their time and the snapshot paths (named for their time)."""
    lines = log_text(out).splitlines()
    return [re.sub(r" path=\S+", "", ln.split(" ", 1)[1]) for ln in lines if not _OWN.search(ln)]


def metadata(out: Path) -> list[dict[str, Any]]:
    found = []
    for meta in snapshots(out):
        for key in ("_path", "created_at", "monitor"):  # monitor: the config, paths and all
            meta.pop(key)
        found.append(meta)
    return sorted(found, key=lambda m: (m["step"], m["triggers"]))


def test_run_writes_what_replay_writes(tmp_path: Path) -> None:
    spec = RunSpec(
        steps=9000, seed=3, noise=0.05,
        anomalies=(Anomaly("loss_spike", 2500, 4.0), Anomaly("lr_zscore", 5200),
                   Anomaly("loss_nonfinite", 7000), Anomaly("wrong_answer_low_loss", 8250)),
    )  # fmt: skip
    lines = [json.dumps(r).encode() for r in simulate(spec)]
    lines[4000:4000] = [b"not json", b"", b'{"step": 5, "loss": "high"}']
    cfg = config(tmp_path, snapshot={"checkpoint_wait_seconds": 0.0})
    cfg.metrics_file.parent.mkdir(parents=True)
    cfg.metrics_file.write_bytes(b"\n".join(lines) + b"\n")
    assert cfg.metrics_file.stat().st_size > 1 << 20  # more than one read, in both

    again = tmp_path / "replayed"
    replay_cfg = cfg.model_copy(
        update={"snapshot_dir": again / "snapshots", "log_dir": again / "logs"}
    )
    log, daily = make_logger(replay_cfg.log_dir, stderr=None)
    engine = replay(replay_cfg, cfg.metrics_file, log)
    if daily is not None:
        daily.close()

    live = Live(cfg)
    live.wait_records(engine.counts["records"], timeout=60)
    live.stop()

    replayed = events(again)
    assert sum("Detected anomaly" in e for e in replayed) >= 4
    assert sum("Skipped malformed line" in e for e in replayed) == 2
    assert events(live.out) == replayed
    assert metadata(live.out) == metadata(again)
    assert live.daemon.engine.pipeline.state_dict() == engine.pipeline.state_dict()
