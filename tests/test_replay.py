"""`smart-monitor replay` end to end, as a user runs it: a real subprocess over a
generated run with real checkpoint folders; names, metadata, log lines, stats."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import make_checkpoint
from synthetic import Anomaly, RunSpec, simulate

ROOT = Path(__file__).resolve().parents[1]
KEYS = {
    "triggers",
    "severity",
    "step",
    "created_at",
    "checkpoint",
    "z_scores",
    "recent_examples",
    "loss_history",
    "lr_history",
    "metrics",
    "monitor",
}
LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (debug|info|warning|error|critical)"
    r" [A-Z][a-z]+( [a-z]+)*( [a-z_]+=\S+)*$"
)


def sm(
    *args: str | Path, check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smart_monitor", *map(str, args)],
        capture_output=True,
        text=True,
        check=check,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    spec = RunSpec(
        steps=3000,
        seed=1,
        noise=0.03,
        anomalies=(
            Anomaly("loss_spike", 1200, 4.0),
            Anomaly("lr_zscore", 2100),
            Anomaly("loss_nonfinite", 2600),
            Anomaly("perfect_answer_high_loss", 2750),
        ),
    )
    with open(run / "metrics.jsonl", "w") as fh:
        for rec in simulate(spec):
            fh.write(json.dumps(rec) + "\n")
    for step in (1000, 2000, 2500):  # what save_total_limit left behind
        make_checkpoint(run / "ck", step)
    (run / "ck" / "tmp-checkpoint-2600").mkdir()
    sm(
        "replay",
        "--metrics",
        run / "metrics.jsonl",
        "--checkpoints",
        run / "ck",
        "--output",
        run / "out",
    )
    return run


def snapshots(run: Path) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for d in sorted((run / "out" / "snapshots").iterdir()):
        out.append((d.name, json.loads((d / "metadata.json").read_text())))
    return out


def at_step(run: Path, step: int, pattern: str) -> tuple[str, dict[str, Any]]:
    found = [(n, m) for n, m in snapshots(run) if m["step"] == step and re.search(pattern, n)]
    assert len(found) == 1, (step, pattern, [n for n, _ in snapshots(run)])
    return found[0]


def test_each_injected_anomaly_has_its_snapshot_and_checkpoint(replayed: Path) -> None:
    expect = {
        1200: (r"loss_(zscore|spike)|MULTIPLE_TRIGGERS", "checkpoint-1000"),
        2100: (r"lr_zscore_", "checkpoint-2000"),
        2600: (r"loss_nonfinite", "checkpoint-2500"),
        2750: (r"perfect_answer_high_loss_", "checkpoint-2500"),
    }
    for step, (pattern, checkpoint) in expect.items():
        name, meta = at_step(replayed, step, pattern)
        assert meta["checkpoint"]["name"] == checkpoint
        assert (replayed / "out" / "snapshots" / name / "model" / "model.safetensors").exists()


def test_snapshot_names_and_metadata_keys(replayed: Path) -> None:
    rx = re.compile(r"^anomaly_\d{8}_\d{6}_[A-Za-z0-9_.\-]+$")
    for name, meta in snapshots(replayed):
        assert rx.match(name)
        assert set(meta) >= KEYS
        assert meta["monitor"]["version"]
        assert isinstance(meta["loss_history"], list) and meta["loss_history"]


def test_metadata_is_strict_json_even_for_nan(replayed: Path) -> None:
    _, meta = at_step(replayed, 2600, "loss_nonfinite")
    assert meta["metrics"]["loss"] == "NaN"
    assert meta["severity"] == "critical"


def test_every_log_line_has_the_contract_format(replayed: Path) -> None:
    logs = list((replayed / "out" / "logs").glob("smart_monitor_*.log"))
    assert len(logs) == 1 and re.fullmatch(r"smart_monitor_\d{8}\.log", logs[0].name)
    lines = logs[0].read_text().splitlines()
    created = [ln for ln in lines if " Created snapshot " in ln]
    assert len(created) == len(snapshots(replayed))  # every snapshot a line names stays
    for ln in created:
        assert LINE.match(ln.split(" path=")[0] + " path=x"), ln
        assert re.search(r" step=\d+ triggers=[^ \"']+ severity=(info|warning|critical) ", ln)
    events = {re.split(r" [a-z_]+=", ln.split(" ", 2)[2])[0] for ln in lines}
    assert {
        "Started",
        "Detected anomaly",
        "Created snapshot",
        "Checkpoint complete",
        "Stopped",
    } <= events


def test_stats_table_counts_by_kind(replayed: Path) -> None:
    out = sm("stats", "--log-dir", replayed / "out" / "logs").stdout
    assert re.search(r"^ +1 lr_zscore_\*$", out, re.M)
    assert re.search(r"^ +1 loss_nonfinite$", out, re.M)
    assert re.search(r"^ +0 inverted_loss_pattern \(good!\)$", out, re.M)
    assert re.search(rf"^ +{len(snapshots(replayed))} snapshots in all$", out, re.M)


def test_readme_grep_pipeline_agrees_with_stats(replayed: Path) -> None:
    """The README's plain grep pipeline, run through bash exactly as written."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- grep-pipeline -->\s*```sh\n(.*?)```", readme, re.S)
    assert block, "README lost its grep pipeline"
    res = subprocess.run(
        ["bash", "-c", block.group(1)],
        cwd=replayed / "out",
        capture_output=True,
        text=True,
        check=True,
    )
    grep_counts = {label: int(n) for n, label in (ln.split() for ln in res.stdout.splitlines())}
    stats = sm("stats", "--log-dir", replayed / "out" / "logs").stdout
    stats_counts = {m[1]: int(m[0]) for m in re.findall(r"^ +(\d+) (\S+)$", stats, re.M)}
    assert grep_counts and grep_counts == {k: v for k, v in stats_counts.items() if v}


def test_replay_is_idempotent_over_the_same_output(replayed: Path) -> None:
    before = sorted(p.name for p in (replayed / "out" / "snapshots").iterdir())
    sm(
        "replay",
        "--metrics",
        replayed / "metrics.jsonl",
        "--checkpoints",
        replayed / "ck",
        "--output",
        replayed / "out",
    )
    assert sorted(p.name for p in (replayed / "out" / "snapshots").iterdir()) == before


def test_bad_input_is_counted_and_logged_never_fatal(tmp_path: Path) -> None:
    lines = [
        b'{"step": 1, "loss": 1.0}',
        b"garbage",
        b'{"step": 2, "loss": NaN}',
        b'{"loss": 3.0}',
        b"\x00" * 100 + b'{"step": 3, "loss": 1.0}',
        b'{"step": 4, "loss": "x"}',
        b"",
        b'{"step": 5, "loss": Infinity}',
    ]
    big = b'{"step": 6, "blob": "' + b"x" * (50 << 20) + b'"}'
    m = tmp_path / "metrics.jsonl"
    m.write_bytes(
        b"\n".join(lines[:4]) + b"\n" + big + b"\n" + b"\n".join(lines[4:]) + b"\n" + b'{"step": 7'
    )
    res = sm("replay", "--metrics", m, "--output", tmp_path / "out")
    assert "malformed" in res.stdout
    counts = re.search(r"replayed (\d+) records \((\d+) malformed\)", res.stdout)
    assert counts and counts.groups() == ("4", "4")  # steps 1, 2, 3 (after its NUL run), 5
    log = next((tmp_path / "out" / "logs").glob("*.log")).read_text()
    reasons = re.findall(r"Skipped malformed line reason=(\w+)", log)
    assert sorted(reasons) == ["bad_type", "invalid_json", "missing_field", "oversized"]
    assert "Skipped NUL bytes count=100" in log
    assert log.count("loss_nonfinite") >= 1


def test_replay_reads_a_trainer_state_file(tmp_path: Path) -> None:
    history = [
        {"step": s, "loss": 2.0 * (s + 10) ** -0.3, "learning_rate": 1e-4} for s in range(1, 400)
    ]
    history[300]["loss"] = float("nan")
    history.append({"step": 399, "train_runtime": 10.0, "train_loss": 0.9})
    (tmp_path / "trainer_state.json").write_text(
        json.dumps({"global_step": 399, "log_history": history})
    )
    res = sm("replay", "--metrics", tmp_path / "trainer_state.json", "--output", tmp_path / "out")
    assert "replayed 400 records (0 malformed)" in res.stdout
    assert any("loss_nonfinite" in p.name for p in (tmp_path / "out" / "snapshots").iterdir())


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("no_such_key = 1\n", "no_such_key"),
        ("[detectors.loss_zscore]\nwindw = 5\n", "detectors.loss_zscore.windw"),
        ('[snapshot]\nmode = "symlink"\n', "snapshot.mode"),
        ("[policy]\ncooldown_steps = -1\n", "policy.cooldown_steps"),
        ('checkpoint_dir = "/r"\nsnapshot_dir = "/r/checkpoint-snaps"\n', "snapshot_dir"),
        ("metrics_file = \n", "invalid TOML"),
    ],
)
def test_bad_config_is_one_line_naming_the_key_exit_2(tmp_path: Path, toml: str, key: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    for args in (["check-config", cfg], ["replay", "--config", cfg, "--metrics", cfg]):
        res = sm(*args, check=False, cwd=tmp_path)
        assert res.returncode == 2
        assert len(res.stderr.strip().splitlines()) == 1 and key in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]  # nothing written


def test_documented_config_is_valid_and_matches_defaults() -> None:
    import tomllib

    from smart_monitor.config import Config

    documented = tomllib.loads((ROOT / "config" / "smart_monitor.toml").read_text())
    defaults = Config().model_dump(mode="json")

    def walk(doc: dict[str, object], default: dict[str, object], prefix: str) -> None:
        for key, value in default.items():
            where = f"{prefix}{key}"
            if isinstance(value, dict) and key != "aliases":
                walk(doc.get(key, {}), value, where + ".")  # type: ignore[arg-type]
            elif value is not None:
                assert key in doc, f"config/smart_monitor.toml does not document {where}"
                assert doc[key] == value, f"{where}: documented {doc[key]!r}, default {value!r}"

    walk(documented, defaults, "")
