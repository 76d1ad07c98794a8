"""``stats``: snapshots counted by trigger kind, read back from the log (the seed's table)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from smart_monitor.triggers import CRITICAL_KINDS, kind_of, stats_label

__all__ = ["count_snapshots", "format_counts", "read_logs"]

_TRIGGERS = re.compile(r" Created snapshot .*?\btriggers=([^ ]+)")


def count_snapshots(lines: Iterable[str]) -> tuple[int, Counter[str]]:
    """(snapshots, triggers per kind). A MULTIPLE_TRIGGERS snapshot counts once for
    each of its triggers, the way the README's grep pipeline counts them."""
    snapshots = 0
    kinds: Counter[str] = Counter()
    for line in lines:
        m = _TRIGGERS.search(line)
        if m is None:
            continue
        snapshots += 1
        for name in m.group(1).strip('"').split(","):
            kinds[kind_of(name)] += 1
    return snapshots, kinds


def read_logs(log_dir: Path) -> Iterable[str]:
    for path in sorted(log_dir.glob("smart_monitor_*.log")):
        with open(path, encoding="utf-8", errors="replace") as fh:
            yield from fh


def format_counts(snapshots: int, kinds: Counter[str]) -> str:
    """Most frequent first; the critical kinds always shown, ``(good!)`` at zero."""
    rows = [f"{n:>7} {stats_label(k)}" for k, n in kinds.most_common()]
    rows += [f"{0:>7} {k} (good!)" for k in CRITICAL_KINDS if kinds[k] == 0]
    return "\n".join([*rows, f"{snapshots:>7} snapshots in all"])
