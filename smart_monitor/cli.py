"""The ``smart-monitor`` command. A bad config is one line naming the key, exit 2
(systemd does not restart on it)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .config import Config, ConfigError, load_config
from .log import make_logger
from .summary import count_snapshots, format_table, read_logs

__all__ = ["main"]

EXIT_CONFIG = 2


def _config_error(message: str) -> NoReturn:
    click.echo(f"smart-monitor: config error: {message}", err=True)
    sys.exit(EXIT_CONFIG)


def _load(
    config: Path | None, metrics: Path | None, checkpoints: Path | None, output: Path | None
) -> Config:
    overrides: dict[str, Any] = {"metrics_file": metrics, "checkpoint_dir": checkpoints}
    if output is not None:
        overrides |= {
            "snapshot_dir": output / "snapshots",
            "log_dir": output / "logs",
            "state_dir": output / "state",
        }
    try:
        return load_config(config, **overrides)
    except ConfigError as exc:
        _config_error(str(exc))


_path = click.Path(path_type=Path)
_config_opt = click.option("--config", "config_file", type=_path, help="TOML config file.")
_metrics_opt = click.option("--metrics", type=_path, help="The trainer's JSONL metrics file.")
_ckpt_opt = click.option("--checkpoints", type=_path, help="The trainer's checkpoint folder.")
_output_opt = click.option(
    "--output", type=_path, help="Sets snapshot_dir, log_dir and state_dir to DIR/snapshots, ..."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="smart-monitor")
def main() -> None:
    """Keep the checkpoint that explains a training anomaly."""


@main.command()
@_config_opt
@_metrics_opt
@_ckpt_opt
@_output_opt
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
def replay(
    config_file: Path | None,
    metrics: Path | None,
    checkpoints: Path | None,
    output: Path | None,
    progress: bool | None,
) -> None:
    """Run the pipeline over a finished run (JSONL metrics or HF trainer_state.json)."""
    from .replay import replay as run_replay

    config = _load(config_file, metrics, checkpoints, output)
    if config.metrics_file is None:
        _config_error("metrics_file: required (--metrics FILE)")
    if not config.metrics_file.is_file():
        click.echo(f"smart-monitor: no such metrics file: {config.metrics_file}", err=True)
        sys.exit(1)
    log, daily = make_logger(config.log_dir, config.log_format, config.log_level)
    engine = run_replay(config, config.metrics_file, log, progress)
    if daily is not None:
        daily.close()
    c = engine.counts
    click.echo(
        f"replayed {c['records']} records ({c['malformed']} malformed): "
        f"{c['detections']} detections, {c['snapshots']} snapshots in {config.snapshot_dir}"
    )


@main.command()
@click.option("--log-dir", type=_path, help="Folder of smart_monitor_*.log files.")
@_output_opt
@_config_opt
def stats(log_dir: Path | None, output: Path | None, config_file: Path | None) -> None:
    """Count snapshots by trigger type (the table the seed's grep pipeline prints)."""
    if log_dir is None:
        log_dir = _load(config_file, None, None, output).log_dir
    if not log_dir.is_dir():
        click.echo(f"smart-monitor: no log folder {log_dir}", err=True)
        sys.exit(1)
    click.echo(format_table(*count_snapshots(read_logs(log_dir))))


@main.command("check-config")
@click.argument("file", type=_path)
def check_config(file: Path) -> None:
    """Validate a config file: silent success (exit 0) or one line naming the key (exit 2)."""
    config = _load(file, None, None, None)
    click.echo(f"{file}: ok (metrics_file={config.metrics_file}, snapshot_dir={config.snapshot_dir})")
