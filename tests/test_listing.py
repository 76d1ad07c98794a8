"""``list`` and ``show`` as a user runs them (real subprocesses) over a replayed run, and
the ``loss_history.png`` replay draws into every snapshot."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from conftest import make_checkpoint
from synthetic import Anomaly, RunSpec, simulate

from smart_monitor.config import load_config
from smart_monitor.hooks.attach import attach_plots
from smart_monitor.outputs.log import make_logger
from smart_monitor.runtime.replay import replay

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def replayed_run(root: Path) -> tuple[Path, Path]:
    """A generated run (a loss spike at 600, a NaN loss at 900, eval every 250 steps)
    with checkpoints every 250 steps, replayed in-process into ``root/out``."""
    run = root / "run"
    run.mkdir(parents=True)
    spec = RunSpec(
        steps=1200, seed=3, logging_steps=5, examples_per_eval=2,
        anomalies=(Anomaly("loss_spike", 600, 4.0), Anomaly("loss_nonfinite", 900)),
    )
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in simulate(spec)))
    for step in range(250, 1201, 250):
        make_checkpoint(run, step)
    out = root / "out"
    config = load_config(
        metrics_file=metrics, checkpoint_dir=run, snapshot_dir=out / "snapshots",
        log_dir=out / "logs", state_dir=out / "state",
    )
    log, daily = make_logger(config.log_dir, stderr=None)
    replay(config, metrics, log, progress=False,  # with the plots, as the command line
           attach=partial(attach_plots, log=log, defer=True))
    assert daily is not None
    daily.close()
    return metrics, out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return replayed_run(tmp_path_factory.mktemp("listing"))


def sm(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smart_monitor", *map(str, args)],
        capture_output=True, text=True, check=check, timeout=60,
    )


def snapshots(out: Path) -> list[tuple[Path, dict[str, object]]]:
    found = [(p, json.loads((p / "metadata.json").read_text()))
             for p in (out / "snapshots").iterdir()]
    return sorted(found, key=lambda pm: str(pm[1]["created_at"]))


def test_list_is_a_table_of_every_snapshot_oldest_first(run: tuple[Path, Path]) -> None:
    _, out = run
    lines = sm("list", "--output", out).stdout.splitlines()
    assert lines[0].split() == [
        "time", "step", "severity", "size", "checkpoint", "triggers", "snapshot"
    ]
    rows, total, budget = lines[1:-2], lines[-2], lines[-1]
    expected = snapshots(out)
    assert len(rows) == len(expected) >= 3
    for row, (path, meta) in zip(rows, expected, strict=True):
        cells = row.split()
        assert cells[2] == str(meta["step"]) and cells[3] == meta["severity"]
        assert cells[-2] == ",".join(meta["triggers"])  # type: ignore[arg-type]
        assert cells[-1] == path.name
    assert "critical" in {row.split()[3] for row in rows}
    assert total.startswith(f"{len(rows)} snapshots, ")
    assert budget.startswith("held ") and " budget; free " in budget


def test_list_reads_the_snapshot_folder_from_the_config(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    _, out = run
    config = tmp_path / "sm.toml"
    config.write_text(f'snapshot_dir = "{out / "snapshots"}"\n')
    by_config = sm("list", "--config", config).stdout.splitlines()
    assert by_config[:-1] == sm("list", "--output", out).stdout.splitlines()[:-1]
    assert by_config[-1].startswith("held ")  # the budget line: free space moves


def test_list_without_snapshots_says_so(tmp_path: Path) -> None:
    done = sm("list", "--output", tmp_path / "nothing", check=False)
    assert done.returncode == 1 and "no snapshot folder" in done.stderr


def test_show_by_name_and_by_path(run: tuple[Path, Path]) -> None:
    _, out = run
    path, meta = next(pm for pm in snapshots(out) if "loss_nonfinite" in pm[1]["triggers"])
    by_name = sm("show", path.name, "--output", out).stdout
    assert by_name == sm("show", path).stdout
    fields = dict(
        line.split(":", 1) for line in by_name.splitlines()[1:] if not line.startswith(" ")
    )
    assert fields["triggers"].strip() == "loss_nonfinite"
    assert fields["severity"].strip() == "critical"
    assert fields["step"].strip() == str(meta["step"])
    assert fields["checkpoint"].strip().startswith("checkpoint-750 (")
    assert '"loss": "NaN"' in fields["metrics"]
    assert fields["loss_history"].strip().endswith(f"{meta['step']}:NaN")


def test_show_json_is_the_stored_metadata(run: tuple[Path, Path]) -> None:
    _, out = run
    path, meta = snapshots(out)[0]
    assert json.loads(sm("show", path, "--json").stdout) == meta


def test_show_a_missing_snapshot_fails(run: tuple[Path, Path]) -> None:
    _, out = run
    done = sm("show", "anomaly_nope", "--output", out, check=False)
    assert done.returncode == 1 and "no readable snapshot" in done.stderr


def test_replay_draws_loss_history_png_into_every_snapshot(run: tuple[Path, Path]) -> None:
    _, out = run
    for path, _meta in snapshots(out):
        png = (path / "loss_history.png").read_bytes()
        assert png[:8] == PNG_MAGIC
        width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk
        assert (width, height) == (900, 320)
        assert sorted(p.name for p in path.iterdir()) == ["loss_history.png", "manifest.json",
                                                          "metadata.json", "model"]


def test_docstring_examples() -> None:
    import doctest

    from smart_monitor.tools import listing

    assert doctest.testmod(listing).failed == 0
