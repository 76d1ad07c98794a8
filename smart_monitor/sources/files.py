"""Finished files for ``replay``: a JSONL metrics file, or an HF ``trainer_state.json``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["OVERSIZED", "iter_lines", "trainer_state_history"]

OVERSIZED = b""  # yielded in place of a line longer than max_line_bytes
_CHUNK = 1 << 20


def iter_lines(fh: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` for every newline-terminated line, without its newline, in
    bounded memory: a line over ``max_line_bytes`` is yielded as ``OVERSIZED`` and its
    bytes are discarded as they stream past. A last line without a newline is not
    yielded (it may still be being written)."""
    offset = 0  # of the start of ``buf``
    buf = b""
    skipping = False
    while True:
        chunk = fh.read(_CHUNK)
        if not chunk:
            return
        if skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                offset += len(chunk)
                continue
            offset += nl + 1
            chunk = chunk[nl + 1 :]
            skipping = False
        buf += chunk
        lines = buf.split(b"\n")
        buf = lines.pop()
        for line in lines:
            if len(line) > max_line_bytes:
                yield offset, OVERSIZED
            elif line:
                yield offset, line
            offset += len(line) + 1
        if len(buf) > max_line_bytes:
            yield offset, OVERSIZED
            offset += len(buf)
            buf = b""
            skipping = True


def trainer_state_history(path: Path) -> list[dict[str, Any]] | None:
    """The ``log_history`` of an HF trainer state file (the run's metric stream), or
    None when ``path`` is not one (a JSONL file holds many objects, not one)."""
    if path.suffix != ".json":
        return None
    try:
        state = json.loads(path.read_bytes())
    except ValueError:
        return None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        return None
    return [e for e in history if isinstance(e, dict)]
