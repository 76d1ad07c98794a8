"""``replay``: the live pipeline over a finished run (JSONL, ``trainer_state.json``,
TensorBoard event files or a Lightning ``metrics.csv``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from smart_monitor.config import Config
from smart_monitor.events import Detected, Event, Listener
from smart_monitor.outputs.snapshot import SnapshotWriter
from smart_monitor.runtime.engine import Engine
from smart_monitor.runtime.ingest import no_cyclic_gc
from smart_monitor.series import SeriesBook
from smart_monitor.sources.checkpoints import CheckpointIndex
from smart_monitor.sources.files import iter_line_chunks, trainer_state_history
from smart_monitor.sources.metrics_source import FolderSource, open_metrics
from smart_monitor.triggers import stats_label

# What the command line attaches to an engine (``hooks``: plots, actions, metrics),
# and how to stop it: runtime drives the core, the layer above composes the hooks.
Attach = Callable[[Engine], Callable[[], None]]

__all__ = ["DetectionReport", "format_series", "replay"]

_PROGRESS_MIN_BYTES = 32 << 20  # a progress bar only for files that take a while


class DetectionReport:
    """An engine listener: per trigger kind, the steps it fired at (``replay --report``),
    so a user can tune thresholds on last week's run before deploying.

    >>> r = DetectionReport()
    >>> for step in (1500, 4300):
    ...     r(Detected("loss_zscore", "critical", step))
    >>> print(r.format())
    trigger                         count  steps
    loss_zscore_*                       2  1500, 4300
    """

    def __init__(self) -> None:
        self.steps: dict[str, list[int]] = {}

    def __call__(self, event: Event) -> None:
        if isinstance(event, Detected):
            self.steps.setdefault(event.kind, []).append(event.step)

    def format(self, max_steps: int = 30) -> str:
        lines = [f"{'trigger':30} {'count':>6}  steps"]
        for kind, steps in sorted(self.steps.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            shown = ", ".join(map(str, steps[:max_steps]))
            more = f", ... (+{len(steps) - max_steps})" if len(steps) > max_steps else ""
            lines.append(f"{stats_label(kind):30} {len(steps):>6}  {shown}{more}")
        if not self.steps:
            lines.append("(no detections)")
        return "\n".join(lines)


def format_series(book: SeriesBook) -> str:
    """``replay --report``'s table of series: name, role, last value.

    >>> b = SeriesBook({}); b.observe({"step": 3, "loss": 0.5, "epoch": 1.0})
    >>> print(format_series(b))
    series                          role                    last value
    epoch                           ignored                          1
    loss                            train_loss                     0.5
    """
    lines = [f"{'series':31} {'role':20} {'last value':>13}"]
    lines += [f"{name[:31]:31} {role:20} {value:>13.6g}" for name, role, value in book.values()]
    if len(lines) == 1:
        lines.append("(no series)")
    return "\n".join(lines)


def replay(
    config: Config,
    metrics: Path,
    log: Any,
    progress: bool | None = None,
    listeners: Sequence[Listener] = (),
    attach: Attach | None = None,
) -> Engine:
    """Feed every record of ``metrics`` through one Engine and return it (its counts);
    ``listeners`` see its events (``DetectionReport``); ``attach``: what the command
    line hooks onto the engine (the plots: each snapshot's ``loss_history.png``, drawn
    after the last record so that drawing never slows the replay), and its stop.

    The run is over, so every checkpoint folder left is complete and no wait for a
    best model's checkpoint can help: both are set accordingly.
    """
    config = config.model_copy(
        update={
            "checkpoints": config.checkpoints.model_copy(update={"settle_seconds": 0.0}),
            "snapshot": config.snapshot.model_copy(update={"checkpoint_wait_seconds": 0.0}),
        }
    )
    index = CheckpointIndex(config.checkpoint_dir, config.checkpoints, clock=lambda: 0.0)
    engine = Engine(config, log, index, SnapshotWriter(config.snapshot_dir, config.snapshot.mode))
    engine.listeners.extend(listeners)
    engine.recover()
    # plots only: no actions, no metrics server, the run is over
    stop_plots = attach(engine) if attach is not None else lambda: None
    engine.scan_checkpoints()
    engine.scan_checkpoints()  # folders without a marker settle on the second scan
    log.info("Started", mode="replay", metrics=str(metrics), checkpoints=str(config.checkpoint_dir))
    engine.ingest.watch.defer = True  # Watching series at the end, every series known
    history = trainer_state_history(metrics)
    source = open_metrics(  # a JSONL tailer is only for run: replay reads the file whole
        metrics, config.source.format, config.records, config.source.quiet_seconds,
        lambda name, fields: log.info(name, **fields), engine.ingest.malformed, lambda: 0.0,
        engine.series,
    )
    with no_cyclic_gc():
        if history is not None:
            engine.ingest.handle_entries(history)
        elif isinstance(source, FolderSource):  # TensorBoard or CSV files
            for entries in source.batches():
                engine.ingest.handle_entries(entries)
            engine.ingest.handle_entries(source.finish())
            source.close()
        else:  # a folder given: the JSONL file the tailer would follow
            path = source.path if source is not None else metrics
            _replay_jsonl(engine, path, config.records.max_line_bytes, progress)
    engine.end_run()  # the file is the whole run: what waits for its end is concluded
    engine.ingest.watch.finish()  # Watching series; No loss series when blind
    engine.finish()
    stop_plots()  # every snapshot's loss_history.png is drawn before replay returns
    log.info("Stopped", mode="replay", **{k: v for k, v in sorted(engine.counts.items())})
    return engine


def _replay_jsonl(
    engine: Engine, metrics: Path, max_line_bytes: int, progress: bool | None
) -> None:
    size = metrics.stat().st_size
    if progress is None:
        progress = sys.stderr.isatty() and size >= _PROGRESS_MIN_BYTES
    with open(metrics, "rb") as fh, tqdm(
        total=size, unit="B", unit_scale=True, disable=not progress, desc="replay"
    ) as bar:
        done = 0
        for offset, lines in iter_line_chunks(fh, max_line_bytes, engine.ingest.skipped_nuls):
            engine.ingest.handle_lines(lines, offset)
            bar.update(offset - done)
            done = offset
        bar.update(size - done)
