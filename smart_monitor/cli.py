"""The ``smart-monitor`` command. A bad config is one line naming the key, exit 2
(systemd does not restart on it)."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import click

from smart_monitor import __version__
from smart_monitor.config import Config, ConfigError, load_config, redact_url
from smart_monitor.outputs.log import make_logger
from smart_monitor.runtime.lock import FolderLock
from smart_monitor.tools.summary import (
    count_snapshots,
    format_counts,
    logged_names,
    read_logs,
    unlogged_snapshots,
)

__all__ = ["main"]

EXIT_CONFIG = 2
EXIT_NO_LOSS = 4  # replay: no loss series in the run (the monitor would be blind)


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


def _prepare(config: Config, locked: tuple[str, ...]) -> list[FolderLock]:
    """What ``run`` and ``replay`` check before touching a folder: the paths (the same
    check as ``check-config``), one instance per folder (FAULTS.md #36: taken before
    start-up removes any ``.tmp-*``), and links from the trainer's files (#35). Each
    failure is one line, exit 2: restarting cannot fix it."""
    from smart_monitor.runtime.lock import LockHeld, lock_folders
    from smart_monitor.runtime.preflight import check_links, check_paths

    try:
        check_paths(config)
        locks = lock_folders({key: getattr(config, key) for key in locked})
    except (ConfigError, LockHeld) as exc:
        _config_error(str(exc))
    problem = check_links(config)
    if problem is not None:
        for lock in locks:
            lock.release()
        _config_error(problem)
    return locks


def _existing_metrics_file(config: Config, jsonl_only: bool = False) -> Path:
    """The metrics file (or folder of event files) a command reads: a config error when
    unset or when its reader is not installed, exit 1 when absent (or, ``jsonl_only``,
    not JSONL)."""
    from smart_monitor.sources.metrics_source import detect_format

    if config.metrics_file is None:
        _config_error("metrics_file: required (--metrics FILE)")
    fmt = detect_format(config.metrics_file, config.source.format)
    if not config.metrics_file.exists() or (jsonl_only and fmt != "jsonl"):
        what = "JSONL metrics file" if jsonl_only else "metrics file"
        click.echo(f"smart-monitor: no such {what}: {config.metrics_file}", err=True)
        sys.exit(1)
    _check_reader(config)
    return config.metrics_file


def _check_reader(config: Config) -> None:
    """Exit 2 with one line naming the extra to install, when the metrics path is in a
    format whose optional reader is missing (TensorBoard)."""
    from smart_monitor.sources.metrics_source import SourceError, detect_format, require_reader

    if config.metrics_file is None:
        return
    try:
        require_reader(detect_format(config.metrics_file, config.source.format))
    except SourceError as exc:
        _config_error(f"metrics_file: {exc}")


_path = click.Path(path_type=Path)
_config_opt = click.option("--config", "config_file", type=_path, help="TOML config file.")
_metrics_opt = click.option(
    "--metrics", type=_path,
    help="The trainer's metrics: JSONL, TensorBoard event file(s) or folder, metrics.csv.",
)
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
@click.option(
    "--progress/--no-progress", default=None, help="Progress bar (default: on a terminal)."
)
@click.option(
    "--report", is_flag=True, help="Print, per trigger type, how often it fired and at which steps."
)
@click.option("--plots/--no-plots", default=True, help="Draw loss_history.png in each snapshot.")
def replay(
    config_file: Path | None,
    metrics: Path | None,
    checkpoints: Path | None,
    output: Path | None,
    progress: bool | None,
    report: bool,
    plots: bool,
) -> None:
    """Run the pipeline over a finished run (JSONL metrics, HF trainer_state.json,
    TensorBoard event files or a Lightning/Ultralytics CSV). Exit 4 when no loss series
    was found (the warning names the tags seen and the alias that would fix it)."""
    from smart_monitor.hooks.attach import attach_plots
    from smart_monitor.runtime.replay import DetectionReport, format_series
    from smart_monitor.runtime.replay import replay as run_replay

    config = _load(config_file, metrics, checkpoints, output)
    metrics_file = _existing_metrics_file(config)
    _prepare(config, ("snapshot_dir",))  # held until the process ends
    log, daily = make_logger(config.log_dir, config.log_format, config.log_level)
    detections = DetectionReport()
    engine = run_replay(config, metrics_file, log, progress, [detections],
                        attach=partial(attach_plots, log=log, defer=True) if plots else None)
    if daily is not None:
        daily.close()
    c = engine.counts
    click.echo(
        f"replayed {c['records']} records ({c['malformed']} malformed): "
        f"{c['detections']} detections, {c['snapshots']} snapshots in {config.snapshot_dir}"
    )
    if report:
        click.echo(detections.format())
        click.echo(format_series(engine.series))
    if engine.ingest.watch.blind:
        sys.exit(EXIT_NO_LOSS)


@main.command()
@_config_opt
@_metrics_opt
@_ckpt_opt
@_output_opt
def run(
    config_file: Path | None, metrics: Path | None, checkpoints: Path | None, output: Path | None
) -> None:
    """Follow a live run until SIGTERM/SIGINT (then save state, exit 0); SIGHUP re-opens
    the log file."""
    import signal

    from smart_monitor.hooks.attach import attach_hooks
    from smart_monitor.runtime.daemon import Daemon
    from smart_monitor.runtime.notify import Notifier

    # structlog's package imports structlog.dev, which imports rich and pygments when
    # they are installed, for console tracebacks the daemon never renders: 4 MB of its
    # resident memory (goal: under 60 MB idle). This process is the daemon's own.
    for pretty in ("rich", "pygments"):
        sys.modules.setdefault(pretty, None)  # type: ignore[arg-type]  # None: absent
    config = _load(config_file, metrics, checkpoints, output)
    if config.metrics_file is None and config.checkpoint_dir is None:
        _config_error("metrics_file: required (--metrics FILE), or checkpoint_dir")
    _prepare(config, ("state_dir", "snapshot_dir"))  # held until the process ends
    _check_reader(config)  # after the paths: check-config's verdict comes first (#53)
    log, daily = make_logger(config.log_dir, config.log_format, config.log_level)
    daemon = Daemon(config, log, daily, Notifier(),
                    hooks=lambda engine, hold, status: attach_hooks(
                        engine, config, log, hold, status))
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    signal.signal(signal.SIGINT, lambda *_: daemon.stop())
    signal.signal(signal.SIGHUP, lambda *_: daemon.reopen_log())
    code = daemon.run()
    if daily is not None:
        daily.close()
    sys.exit(code)


@main.command()
@click.option("--log-dir", type=_path, help="Folder of smart_monitor_*.log files.")
@_output_opt
@_config_opt
def stats(log_dir: Path | None, output: Path | None, config_file: Path | None) -> None:
    """Count snapshots by trigger type (the table the seed's grep pipeline prints); a
    snapshot whose log line was lost (a full log disk) is counted from its metadata."""
    if log_dir is None or output is not None or config_file is not None:
        config = _load(config_file, None, None, output)
        log_dir, snapshot_dir = log_dir or config.log_dir, config.snapshot_dir
    else:  # --log-dir alone: the layout --output makes, DIR/logs beside DIR/snapshots
        snapshot_dir = log_dir.parent / "snapshots"
    if not log_dir.is_dir():
        click.echo(f"smart-monitor: no log folder {log_dir}", err=True)
        sys.exit(1)
    unlogged = unlogged_snapshots(snapshot_dir, logged_names(read_logs(log_dir)))
    counted = count_snapshots(read_logs(log_dir), unlogged)
    click.echo(format_counts(*counted, unlogged=len(unlogged)))


@main.command("list")
@_output_opt
@_config_opt
def list_snapshots(output: Path | None, config_file: Path | None) -> None:
    """A table of snapshots: time, step, severity, size, checkpoint, triggers."""
    from smart_monitor.outputs.retention import disk_budget
    from smart_monitor.outputs.snapshot import SnapshotWriter
    from smart_monitor.tools.listing import format_budget, format_snapshots, read_snapshots

    config = _load(config_file, None, None, output)
    snapshot_dir = config.snapshot_dir
    if not snapshot_dir.is_dir():
        click.echo(f"smart-monitor: no snapshot folder {snapshot_dir}", err=True)
        sys.exit(1)
    click.echo(format_snapshots(read_snapshots(snapshot_dir)))
    click.echo(format_budget(disk_budget(SnapshotWriter(snapshot_dir), config.snapshot)))


@main.command()
@click.argument("snapshot")
@_output_opt
@_config_opt
@click.option("--json", "as_json", is_flag=True, help="The whole metadata.json, as stored.")
def show(snapshot: str, output: Path | None, config_file: Path | None, as_json: bool) -> None:
    """One snapshot's metadata, readable: SNAPSHOT is its folder, or its name in the
    snapshot folder of --output/--config."""
    import json

    from smart_monitor.explain import explain
    from smart_monitor.tools.listing import format_explanation, format_metadata, resolve

    path = resolve(snapshot, _load(config_file, None, None, output).snapshot_dir)
    try:
        meta = json.loads((path / "metadata.json").read_bytes())
    except (OSError, ValueError) as exc:
        click.echo(f"smart-monitor: no readable snapshot at {path}: {exc}", err=True)
        sys.exit(1)
    hook = (((meta.get("monitor") or {}).get("config") or {}).get("actions") or {}).get("webhook")
    if isinstance(hook, dict) and hook.get("url"):  # a snapshot made before it was redacted
        hook["url"] = redact_url(str(hook["url"]))
    if as_json:
        click.echo(json.dumps(meta, indent=2))
        return
    # made again from the metadata as it is now: weights released since, a folder moved
    explained = format_explanation(explain(meta, str(path.absolute())))
    click.echo(f"{path}\n{format_metadata(meta)}\n{explained}")


@main.command("explain")
@click.argument("trigger", required=False)
def explain_trigger(trigger: str | None) -> None:
    """What TRIGGER means and what to do: a trigger name as the log writes it
    (loss_zscore_43.20, val_cls_loss_nonfinite) or a family (loss_zscore); without
    TRIGGER, every family."""
    from smart_monitor.meanings import ENTRIES, lookup
    from smart_monitor.tools.listing import format_entry

    if trigger is None:
        for e in ENTRIES:
            click.echo(f"{e.family:<26}{e.what}")
        return
    entry = lookup(trigger)
    if entry is None:
        families = ", ".join(e.family for e in ENTRIES)
        click.echo(f"smart-monitor: no trigger family matches {trigger!r} ({families})", err=True)
        sys.exit(1)
    click.echo(format_entry(entry, trigger))


@main.command()
@click.argument("snapshot")
@_output_opt
@_config_opt
def verify(snapshot: str, output: Path | None, config_file: Path | None) -> None:
    """Check that a snapshot's model/ is as it was pinned (sizes, modification and inode
    change times, a content sample, against its manifest.json): a hard-linked file
    rewritten in place by the trainer shows here, even with its mtime put back.
    Exit 0: intact; 1: changed or unreadable; 2: no such snapshot."""
    from smart_monitor.outputs.manifest import changes
    from smart_monitor.tools.listing import resolve

    path = resolve(snapshot, _load(config_file, None, None, output).snapshot_dir)
    if not (path / "metadata.json").is_file():
        click.echo(f"smart-monitor: no such snapshot: {path}", err=True)
        sys.exit(EXIT_CONFIG)
    if not (path / "model").exists():
        click.echo(f"{path}: no model/ (metadata only, or weights released): nothing to verify")
        return
    try:
        found = changes(path)
    except (OSError, ValueError) as exc:
        click.echo(f"smart-monitor: cannot verify {path}: {exc}", err=True)
        sys.exit(1)
    for change in found:
        click.echo(f"changed {change}")
    if found:
        click.echo(f"{path}: {len(found)} file(s) changed since pinned", err=True)
        sys.exit(1)
    click.echo(f"{path}: intact")


@main.command()
@_config_opt
@_metrics_opt
@_output_opt
@click.option("--html", "html_file", type=_path, help="Write the page here, not DIR/report.html.")
def report(
    config_file: Path | None, metrics: Path | None, output: Path | None, html_file: Path | None
) -> None:
    """An HTML page: loss, learning rate and accuracy against step with every snapshot
    marked, and the snapshot tables (needs smart-monitor[report])."""
    from smart_monitor.tools.report import write_report

    config = _load(config_file, metrics, None, output)
    metrics_file = _existing_metrics_file(config, jsonl_only=True)
    target = html_file or (output or config.snapshot_dir.parent) / "report.html"
    path = write_report(
        metrics_file, config.snapshot_dir, target, config.records.aliases,
        config.records.max_line_bytes,
    )
    click.echo(f"wrote {path}")


@main.command("check-config")
@click.argument("file", type=_path)
def check_config(file: Path) -> None:
    """Validate a config file: silent success (exit 0) or one line naming the key (exit 2)."""
    from smart_monitor.runtime.preflight import check_paths

    config = _load(file, None, None, None)
    try:  # the same checks in the same order as ``run``: the same verdict
        check_paths(config)
    except ConfigError as exc:
        _config_error(str(exc))
    _check_reader(config)
    click.echo(
        f"{file}: ok (metrics_file={config.metrics_file}, snapshot_dir={config.snapshot_dir})"
    )


EXIT_NONFINITE = 3


@main.command()
@click.argument("path", metavar="SNAPSHOT_OR_CHECKPOINT", type=_path)
@click.option("--against", type=_path, help="Another checkpoint: show the layers that moved most.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of the table.")
@click.option("--top", default=10, show_default=True, help="Layers shown in the moved-most list.")
def inspect(path: Path, against: Path | None, as_json: bool, top: int) -> None:
    """Parameters, NaN/Inf tensors and layer norms of a checkpoint's weights.

    Reads model.safetensors memory-mapped, tensor by tensor (a checkpoint larger than RAM
    works), or a torch .bin/.pt/.ckpt with weights_only=True (needs smart-monitor[torch]).
    Exit 3 when a tensor holds NaN or Inf, 1 when the weights cannot be read.
    """
    import json

    from smart_monitor.forensics import (
        CheckpointError,
        compare_checkpoints,
        format_text,
        inspect_checkpoint,
    )

    try:
        ins = inspect_checkpoint(path)
        cmp = compare_checkpoints(path, against) if against is not None else None
    except (CheckpointError, OSError) as exc:  # OSError: a file vanished or is unreadable
        click.echo(f"smart-monitor: {exc}", err=True)
        sys.exit(1)
    if as_json:
        out = ins.to_dict()
        if cmp is not None:
            out["against"] = cmp.to_dict()
        click.echo(json.dumps(out, indent=2, default=str))
    else:
        click.echo(format_text(ins, cmp, top))
    if ins.nonfinite:
        sys.exit(EXIT_NONFINITE)
