"""``list`` and ``show``: look at the snapshots without opening JSON files by hand."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smart_monitor.explain import Explanation, causes_sentence
from smart_monitor.meanings import Entry
from smart_monitor.outputs.retention import DiskBudget
from smart_monitor.outputs.snapshot import SnapshotWriter

__all__ = [
    "SnapshotInfo", "format_budget", "format_entry", "format_explanation", "format_metadata",
    "format_snapshots", "read_snapshots", "resolve",
]

_HISTORY_SHOWN = 5  # last [step, value] pairs that ``show`` prints of each history


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    path: Path
    created_at: str
    step: int | None
    triggers: tuple[str, ...]
    severity: str
    checkpoint: str | None
    bytes: int


def read_snapshots(snapshot_dir: Path) -> list[SnapshotInfo]:
    """Every published snapshot, oldest first (by ``created_at``, in milliseconds: names
    made in the same second sort by trigger name otherwise)."""
    infos = []
    for path, meta in SnapshotWriter(snapshot_dir).published():
        ck = meta.get("checkpoint")
        infos.append(
            SnapshotInfo(
                path=path,
                created_at=str(meta.get("created_at", "")),
                step=meta.get("step"),
                triggers=tuple(meta.get("triggers", ())),
                severity=str(meta.get("severity", "")),
                checkpoint=(
                    f"{ck.get('name')}{' (released)' if meta.get('released') else ''}"
                    if isinstance(ck, Mapping) else None
                ),
                bytes=_size(path),
            )
        )
    infos.sort(key=lambda i: (i.created_at, i.path.name))
    return infos


def _size(root: Path) -> int:
    """Apparent size: a hard-linked file counts in full, though it shares its blocks
    with the trainer's checkpoint until rotation deletes that."""
    total = 0
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_size
            except FileNotFoundError:
                continue
    return total


def human_bytes(n: float) -> str:
    """Binary units, one decimal, as ``ls -lh`` and ``du -h`` show sizes.

    >>> human_bytes(512), human_bytes(1536), human_bytes(3 << 30)
    ('512 B', '1.5 KiB', '3.0 GiB')
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_snapshots(infos: Sequence[SnapshotInfo]) -> str:
    header = ("time", "step", "severity", "size", "checkpoint", "triggers", "snapshot")
    rows = [
        (
            i.created_at.replace("T", " ")[:19],
            "" if i.step is None else str(i.step),
            i.severity,
            human_bytes(i.bytes),
            i.checkpoint or "none",
            ",".join(i.triggers),
            i.path.name,
        )
        for i in infos
    ]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1]
        for r in [header, *rows]
    ]
    lines.append(f"{len(infos)} snapshots, {human_bytes(sum(i.bytes for i in infos))}")
    return "\n".join(lines)


def format_budget(budget: DiskBudget) -> str:
    """The disk budget under the table: what the snapshots add against their share,
    and the free space against its floor (what ``enforce_budget`` keeps)."""
    share = f"of {human_bytes(budget.budget)} budget" if budget.budget else "(no budget)"
    floor = f"floor {human_bytes(budget.floor)}" if budget.floor else "no floor"
    return f"held {human_bytes(budget.held)} {share}; free {human_bytes(budget.free)} ({floor})"


def resolve(name: str, snapshot_dir: Path) -> Path:
    """A snapshot given as a path, or by its folder name inside ``snapshot_dir``."""
    direct = Path(name)
    if (direct / "metadata.json").is_file():
        return direct
    return snapshot_dir / name


def format_metadata(meta: Mapping[str, Any]) -> str:
    """The metadata a person reads first at the top; the long parts (histories,
    examples, the monitor's config) shortened. ``show --json`` prints it all."""
    out = []
    for key in ("triggers", "severity", "step", "created_at", "segment"):
        if key in meta:
            value = meta[key]
            out.append(f"{key + ':':<16}{','.join(value) if key == 'triggers' else value}")
    ck = meta.get("checkpoint")
    if isinstance(ck, Mapping):
        out.append(
            f"{'checkpoint:':<16}{ck.get('name')} ({ck.get('mode')}, {ck.get('files')} files, "
            f"{human_bytes(ck.get('bytes') or 0)}) from {ck.get('path')}"
        )
    else:
        out.append(f"{'checkpoint:':<16}none ({meta.get('note', 'no checkpoint')})")
    released = meta.get("released")
    if isinstance(released, Mapping):
        out.append(
            f"{'released:':<16}weights freed {released.get('at')} ({released.get('reason')}, "
            f"{human_bytes(released.get('bytes') or 0)})"
        )
    out.append(f"{'z_scores:':<16}{_compact(meta.get('z_scores'))}")
    out.append(f"{'metrics:':<16}{_compact(meta.get('metrics'))}")
    for name, detail in (meta.get("details") or {}).items():
        out.append(f"{'details:':<16}{name} {_compact(detail)}")
    for key in ("loss_history", "lr_history"):
        history = meta.get(key) or []
        tail = " ".join(f"{s}:{_num(v)}" for s, v in history[-_HISTORY_SHOWN:])
        out.append(f"{key + ':':<16}{len(history)} points, last {tail}")
    examples = meta.get("recent_examples") or []
    out.append(f"{'examples:':<16}{len(examples)} recent")
    for ex in examples[-3:]:
        out.append(f"  {_compact({k: ex.get(k) for k in ('step', 'matches', 'loss', 'prompt')})}")
    monitor = meta.get("monitor") or {}
    out.append(f"{'monitor:':<16}version {monitor.get('version')} (config: show --json)")
    return "\n".join(out)


def _num(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": "), default=str)


# -- what a snapshot means (``explain.py``), as ``show`` and ``explain`` print it -------
_SHOWN_CAUSES = 3


def format_explanation(ex: Explanation) -> str:
    """The two sections ``show`` prints under the metadata: short, so the likely causes
    are the first few (``explain`` and the metadata have them all)."""
    causes = ex.causes[:_SHOWN_CAUSES]
    more = [f"more: smart-monitor explain {ex.trigger}"] if len(ex.causes) > len(causes) else []
    return _sections(
        None, [f"{ex.evidence}.", ex.what, causes_sentence((*causes, *more))],
        [*_numbered(ex.checks), f"Action: {ex.action}", f"Rollback: {ex.rollback}"],
    )


def format_entry(entry: Entry, name: str = "") -> str:
    """An entry as ``smart-monitor explain`` prints it, headed by the trigger ``name``
    asked for and its family."""
    title = entry.family if name in ("", entry.family) else f"{name} ({entry.family})"
    critical = [f"If critical: {entry.if_critical}"] if entry.if_critical else []
    stays = ["If critical (it stays or repeats), most likely first:",
             *(f"- {c}" for c in entry.critical_causes)] if entry.critical_causes else []
    return _sections(
        title, [entry.what, "Likely causes, most likely first:",
                *(f"- {c}" for c in entry.causes), *stays],
        [*_numbered(entry.checks), f"Action: {entry.action}", *critical],
    )


def _sections(title: str | None, meaning: Sequence[str], todo: Sequence[str]) -> str:
    """Wrapped to 88 columns; a path or a resume call is never broken (copy, paste)."""
    out = [title] if title else []
    for head, paragraphs in (("What it means:", meaning), ("What to do:", todo)):
        out.append(head)
        for p in paragraphs:
            hang = "     " if p[:1].isdigit() else "    "  # under a check's text
            out.append(textwrap.fill(p, 88, initial_indent="  ", subsequent_indent=hang,
                                     break_long_words=False, break_on_hyphens=False))
    return "\n".join(out)


def _numbered(checks: Sequence[str]) -> list[str]:
    return [f"{i}. {c}" for i, c in enumerate(checks, 1)]
