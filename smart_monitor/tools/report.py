"""``report``: one self-contained HTML page for a run (loss, learning rate and accuracy
against step, every snapshot marked on the curves, the snapshot tables), and the
``loss_history.png`` drawn into each snapshot.

matplotlib (extra ``[report]``) is imported here only, lazily, with the object API and
the Agg canvas: no pyplot global state, so drawing on a worker thread is safe and the
daemon never pays for the import unless it draws.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from smart_monitor.explain import explain
from smart_monitor.outputs.atomic import write_atomic
from smart_monitor.records import (
    EvalRecord,
    MalformedLine,
    Record,
    TrainRecord,
    parse_line,
    to_record,
)
from smart_monitor.series import SeriesBook
from smart_monitor.sources.files import OVERSIZED, iter_lines, trainer_state_history
from smart_monitor.tools.listing import SnapshotInfo, human_bytes, read_snapshots
from smart_monitor.triggers import kind_of, stats_label

__all__ = ["Series", "load_series", "write_loss_history_png", "write_report"]

Points = list[tuple[int, float]]

_MAX_POINTS = 4000  # per curve; more are reduced to per-bucket min and max (spikes stay)
_COLORS = {"critical": "#d62728", "warning": "#ff7f0e", "info": "#2ca02c"}
_WIDTH, _HEIGHT, _DPI = 9.0, 3.2, 100


@dataclass(slots=True)
class Series:
    loss: Points = field(default_factory=list)
    eval_loss: Points = field(default_factory=list)
    learning_rate: Points = field(default_factory=list)
    accuracy: Points = field(default_factory=list)
    records: int = 0
    malformed: int = 0

    def add(self, record: Record | None) -> None:
        if record is None:
            return
        self.records += 1
        if isinstance(record, TrainRecord):
            if record.loss is not None:
                self.loss.append((record.step, record.loss))
            if record.learning_rate is not None:
                self.learning_rate.append((record.step, record.learning_rate))
        elif isinstance(record, EvalRecord):
            if record.eval_loss is not None:
                self.eval_loss.append((record.step, record.eval_loss))
            if record.accuracy is not None:
                self.accuracy.append((record.step, record.accuracy))


def load_series(path: Path, aliases: dict[str, str], max_line_bytes: int) -> Series:
    """The curves of a JSONL metrics file or an HF ``trainer_state.json``, read with the
    monitor's own parser so the page shows what the detectors saw."""
    series = Series()
    is_main = SeriesBook(aliases).is_main  # the main eval loss chosen as the ingest does
    history = trainer_state_history(path)
    if history is not None:
        for entry in history:
            try:
                series.add(to_record(entry, aliases, is_main))
            except MalformedLine:
                series.malformed += 1
        return series
    with open(path, "rb") as fh:
        for _offset, line in iter_lines(fh, max_line_bytes):
            try:
                if line == OVERSIZED:
                    raise MalformedLine("oversized")
                series.add(parse_line(line, aliases, is_main))
            except MalformedLine:
                series.malformed += 1
    return series


def _reduce(points: Points) -> tuple[list[int], list[float]]:
    """Finite points only, at most about ``_MAX_POINTS``: each bucket keeps its lowest
    and highest value, so a one-step spike still shows on a million-step run."""
    pts = [(s, v) for s, v in points if math.isfinite(v)]
    if len(pts) > _MAX_POINTS:
        size = math.ceil(len(pts) / (_MAX_POINTS // 2))
        kept = []
        for i in range(0, len(pts), size):
            bucket = pts[i : i + size]
            lo, hi = min(bucket, key=lambda p: p[1]), max(bucket, key=lambda p: p[1])
            kept.extend(sorted({lo, hi}))
        pts = kept
    return [s for s, _ in pts], [v for _, v in pts]


def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(_WIDTH, _HEIGHT), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _mark(ax: Any, marks: Sequence[tuple[int, str]]) -> None:
    """A vertical line at each snapshot's step, coloured by severity, one legend entry each."""
    seen: set[str] = set()
    for step, severity in marks:
        label = f"snapshot ({severity})" if severity not in seen else None
        seen.add(severity)
        ax.axvline(step, color=_COLORS.get(severity, "#7f7f7f"), alpha=0.7, lw=1,
                   ls="--", label=label)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _plot(
    curves: dict[str, Points], title: str, ylabel: str, marks: Sequence[tuple[int, str]]
) -> bytes | None:
    if not any(curves.values()):
        return None
    fig, ax = _figure(title, ylabel)
    for label, points in curves.items():
        if points:
            xs, ys = _reduce(points)
            ax.plot(xs, ys, lw=1, label=label, marker="." if len(xs) < 50 else None)
    _mark(ax, marks)
    ax.legend(fontsize=8, loc="best")
    return _png(fig)


def write_loss_history_png(snapshot: Path) -> Path:
    """``snapshot/loss_history.png`` from its metadata's loss_history, written to a
    temporary name and renamed, so a reader never sees half a picture."""
    meta = json.loads((snapshot / "metadata.json").read_bytes())
    history = [(int(s), float(v)) for s, v in meta.get("loss_history", [])]
    step = meta.get("step")
    title = f"{','.join(meta.get('triggers', []))} at step {step} ({meta.get('severity')})"
    fig, ax = _figure(title, "loss")
    xs, ys = _reduce(history)
    ax.plot(xs, ys, lw=1, marker="." if len(xs) < 50 else None, label="loss")
    nonfinite = [s for s, v in history if not math.isfinite(v)]
    if nonfinite and ys:
        ax.plot(nonfinite, [max(ys)] * len(nonfinite), "x", color="#d62728", label="NaN/Inf")
    if isinstance(step, int):
        _mark(ax, [(step, str(meta.get("severity")))])
    ax.legend(fontsize=8, loc="best")
    return write_atomic(snapshot / "loss_history.png", _png(fig))


# -- the page -------------------------------------------------------------------------
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em auto;max-width:960px;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
img.plot{width:100%;border:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;border-bottom:1px solid #eee;
text-align:left;white-space:nowrap}td.n{text-align:right}.critical{color:#d62728}.warning{color:#c65f00}
.info{color:#2ca02c}p.none{color:#777}
div.snap{display:flex;gap:1em;align-items:flex-start;margin:1em 0;border-top:1px solid #eee}
img.snap-plot{width:45%;flex:none;border:1px solid #ddd}h3{font-size:1em}
div.why{font-size:13px;min-width:0;overflow-wrap:anywhere}
"""


def _img(png: bytes | None, name: str, alt: str, steps: Sequence[int]) -> str:
    if png is None:
        return f'<p class="none" id="plot-{name}">No {html.escape(alt)} in the metrics file.</p>'
    data = base64.b64encode(png).decode()
    # onload records that the browser decoded the image (the render test reads it back)
    return (
        f'<img class="plot" id="plot-{name}" alt="{html.escape(alt)}" '
        f'data-snapshot-steps="{",".join(map(str, steps))}" '
        f'onload="this.dataset.rendered=this.naturalWidth" src="data:image/png;base64,{data}">'
    )


def _tables(infos: Sequence[SnapshotInfo], page_dir: Path) -> str:
    kinds: Counter[str] = Counter(kind_of(t) for i in infos for t in i.triggers)
    out = ["<h2>Snapshots by trigger</h2>"]
    if kinds:
        out.append('<table id="stats"><tr><th>snapshots</th><th>trigger</th></tr>')
        out += [f'<tr><td class="n">{n}</td><td>{html.escape(stats_label(k))}</td></tr>'
                for k, n in kinds.most_common()]
        out.append("</table>")
    out.append(f"<p>{len(infos)} snapshots, {human_bytes(sum(i.bytes for i in infos))}.</p>")
    if not infos:
        return "\n".join(out)
    out.append('<h2>Snapshots</h2><table id="snapshots"><tr><th>time (UTC)</th><th>step</th>'
               "<th>severity</th><th>size</th><th>checkpoint</th><th>triggers</th>"
               "<th>snapshot</th></tr>")
    for i in infos:
        href = html.escape(os.path.relpath(i.path / "metadata.json", page_dir))
        out.append(
            f"<tr><td>{html.escape(i.created_at)}</td><td class='n'>{i.step}</td>"
            f"<td class='{html.escape(i.severity)}'>{html.escape(i.severity)}</td>"
            f"<td class='n'>{human_bytes(i.bytes)}</td><td>{html.escape(i.checkpoint or 'none')}"
            f"</td><td>{html.escape(', '.join(i.triggers))}</td>"
            f"<td><a href='{href}'>{html.escape(i.path.name)}</a></td></tr>"
        )
    out.append("</table>")
    return "\n".join(out)


def _explained(infos: Sequence[SnapshotInfo]) -> str:
    """Each snapshot's ``loss_history.png`` with, beside it, what it means and what to
    do (``explain.py``, from its metadata as it is now)."""
    out = ["<h2>What each snapshot means</h2>"] if infos else []
    for n, info in enumerate(infos):
        try:
            meta = json.loads((info.path / "metadata.json").read_bytes())
        except (OSError, ValueError) as exc:  # removed by retention meanwhile, or by hand
            out.append(f'<p class="none">{html.escape(f"{info.path.name}: {exc}")}</p>')
            continue
        ex = explain(meta, str(info.path.absolute()))
        title = html.escape(f"{', '.join(info.triggers)} at step {info.step} ({info.severity})")
        plot = info.path / "loss_history.png"
        img = (
            f'<img class="snap-plot" id="snap-{n}" alt="loss before {title}" '
            'onload="this.dataset.rendered=this.naturalWidth" '
            f'src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}">'
            if plot.is_file() else '<p class="none snap-plot">No plot.</p>'
        )
        checks = "".join(f"<li>{html.escape(c)}</li>" for c in ex.checks)
        out.append(
            f'<div class="snap" id="explain-{n}">{img}<div class="why">'
            f'<h3 class="{html.escape(info.severity)}">{title}</h3>'
            f"<p><b>What it means.</b> {html.escape(ex.meaning)}</p><p><b>What to do.</b></p>"
            f"<ol>{checks}</ol><p><b>Action:</b> {html.escape(ex.action)}</p>"
            f"<p><b>Rollback:</b> {html.escape(ex.rollback)}</p></div></div>"
        )
    return "\n".join(out)


def write_report(
    metrics: Path, snapshot_dir: Path, target: Path, aliases: dict[str, str], max_line_bytes: int
) -> Path:
    """Write the page to ``target`` (tmp name, then rename) and return it."""
    series = load_series(metrics, aliases, max_line_bytes)
    infos = read_snapshots(snapshot_dir)
    for info in infos:  # a daemon stops without waiting for pictures: drawn here instead
        if not (info.path / "loss_history.png").exists():
            write_loss_history_png(info.path)
    marks = [(i.step, i.severity) for i in infos if isinstance(i.step, int)]
    steps = [s for s, _ in marks]
    plots = [
        ("loss", "loss", _plot({"train loss": series.loss, "eval loss": series.eval_loss},
                               "Loss", "loss", marks)),
        ("lr", "learning rate", _plot({"learning rate": series.learning_rate},
                                      "Learning rate", "learning rate", marks)),
        ("accuracy", "accuracy", _plot({"eval accuracy": series.accuracy},
                                       "Accuracy", "accuracy", marks)),
    ]
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    body = [
        f"<h1>smart_monitor report: {html.escape(metrics.name)}</h1>",
        f"<p>{html.escape(str(metrics))}: {series.records} records ({series.malformed} "
        f"malformed); snapshots from {html.escape(str(snapshot_dir))}; made {now}. Dashed "
        "lines mark snapshots (red critical, orange warning, green info).</p>",
    ]
    for name, alt, png in plots:
        body.append(f"<h2>{html.escape(alt.capitalize())}</h2>")
        body.append(_img(png, name, f"{alt} against step", steps))
    body.append(_tables(infos, target.parent.resolve()))
    body.append(_explained(infos))
    page = (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>smart_monitor report: {html.escape(metrics.name)}</title>"
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(target, page.encode())


def main(argv: Sequence[str]) -> int:
    """``python -m smart_monitor.tools.report SNAPSHOT...``: draw each ``loss_history.png``
    (the daemon runs this in a child process, see ``hooks.attach_plots``). A picture is
    background work: the child yields the CPU to the daemon reading a backlog, and to
    the trainer."""
    os.nice(10)
    failed = 0
    for arg in argv:
        try:
            write_loss_history_png(Path(arg))
        except Exception as exc:  # one bad snapshot must not cost the others their plot
            print(f"{arg}: {exc!r}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
