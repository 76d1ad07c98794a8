"""``stats``: snapshots counted by trigger kind, read back from the log (the seed's table),
and from the snapshots' own metadata for those whose log line was lost (a full log
disk drops lines, never snapshots: FAULTS.md #64)."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from smart_monitor.triggers import CRITICAL_KINDS, kind_of, stats_label

__all__ = ["count_snapshots", "format_counts", "logged_names", "read_logs", "unlogged_snapshots"]

_TRIGGERS = re.compile(r" Created snapshot .*?\btriggers=([^ ]+)")
_PATH = re.compile(r" path=(\"(?:[^\"\\]|\\.)*\"|[^ ]+)")


def _created(line: str) -> tuple[list[str], str | None] | None:
    """The triggers and the folder name of a ``Created snapshot`` line, text or JSON.

    >>> _created("... warning Created snapshot step=5 triggers=a,b path=/s/anomaly_x")
    (['a', 'b'], 'anomaly_x')
    """
    line = line.rstrip("\r\n")
    if line.startswith("{"):
        if '"Created snapshot"' not in line:
            return None
        try:
            event = json.loads(line)
        except ValueError:
            return None
        if not isinstance(event, dict) or event.get("event") != "Created snapshot":
            return None
        triggers = event.get("triggers", [])
        names = triggers.split(",") if isinstance(triggers, str) else list(map(str, triggers))
        path = event.get("path")
        return names, Path(str(path)).name if path else None
    m = _TRIGGERS.search(line)
    if m is None:
        return None
    p = _PATH.search(line, m.end())
    return m.group(1).strip('"').split(","), Path(p.group(1).strip('"')).name if p else None


def count_snapshots(
    lines: Iterable[str], unlogged: Iterable[list[str]] = ()
) -> tuple[int, Counter[str]]:
    """(snapshots, triggers per kind). A MULTIPLE_TRIGGERS snapshot counts once for
    each of its triggers, the way the README's grep pipeline counts them. ``unlogged``:
    the triggers of snapshots whose log line was lost, counted alike."""
    snapshots = 0
    kinds: Counter[str] = Counter()
    for line in lines:
        found = _created(line)
        if found is None:
            continue
        snapshots += 1
        for name in found[0]:
            kinds[kind_of(name)] += 1
    for names in unlogged:
        snapshots += 1
        for name in names:
            kinds[kind_of(name)] += 1
    return snapshots, kinds


def logged_names(lines: Iterable[str]) -> set[str]:
    """The folder names of the snapshots the log says were created."""
    return {found[1] for line in lines if (found := _created(line)) and found[1]}


def unlogged_snapshots(snapshot_dir: Path, logged: set[str]) -> list[list[str]]:
    """The triggers of each published snapshot whose ``Created snapshot`` line is not
    in the log (``logged``), read from its ``metadata.json``."""
    out: list[list[str]] = []
    if not snapshot_dir.is_dir():
        return out
    for path in sorted(snapshot_dir.glob("anomaly_*/metadata.json")):
        if path.parent.name in logged:
            continue
        try:
            triggers = json.loads(path.read_bytes()).get("triggers")
        except (OSError, ValueError, AttributeError):
            continue  # unreadable: `verify` and `list` say why
        if isinstance(triggers, list) and triggers:
            out.append([str(t) for t in triggers])
    return out


def read_logs(log_dir: Path) -> Iterable[str]:
    for path in sorted(log_dir.glob("smart_monitor_*.log")):
        with open(path, encoding="utf-8", errors="replace") as fh:
            yield from fh


def format_counts(snapshots: int, kinds: Counter[str], unlogged: int = 0) -> str:
    """Most frequent first; the critical kinds always shown, ``(good!)`` at zero."""
    rows = [f"{n:>7} {stats_label(k)}" for k, n in kinds.most_common()]
    rows += [f"{0:>7} {k} (good!)" for k in CRITICAL_KINDS if kinds[k] == 0]
    rows.append(f"{snapshots:>7} snapshots in all")
    if unlogged:
        rows.append(f"{unlogged:>7} of them not in the log (lines lost), "
                    "counted from their metadata.json")
    return "\n".join(rows)
