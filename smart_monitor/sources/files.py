"""Finished files for ``replay``: a JSONL metrics file, or an HF ``trainer_state.json``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

__all__ = ["OVERSIZED", "iter_line_chunks", "iter_lines", "trainer_state_history"]

OVERSIZED = b""  # yielded in place of a line longer than max_line_bytes
_CHUNK = 1 << 20


def iter_line_chunks(fh: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, list[bytes | None]]]:
    """The file's newline-terminated lines (without the newline), a list per read, with
    the byte offset of its first line; each line takes ``len(line) + 1`` bytes, so the
    consumer can tell every line's offset. ``None`` stands for a line longer than
    ``max_line_bytes`` and always ends its list (its bytes are discarded as they stream
    past: memory stays bounded). A last line without a newline is not yielded (it may
    still be being written). Empty lines are kept: they count for the offsets."""
    offset = 0  # of the start of ``buf``
    buf = b""
    skipping = False
    while chunk := fh.read(_CHUNK):
        if skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                offset += len(chunk)
                continue
            offset += nl + 1
            chunk = chunk[nl + 1 :]
            skipping = False
        buf += chunk
        lines: list[bytes] = buf.split(b"\n")
        buf = lines.pop()
        if lines and max(map(len, lines)) > max_line_bytes:  # rare: split around them
            part: list[bytes | None] = []
            start = offset
            for line in lines:
                offset += len(line) + 1
                if len(line) > max_line_bytes:
                    part.append(None)
                    yield start, part
                    start, part = offset, []
                else:
                    part.append(line)
            if part:
                yield start, part
        elif lines:
            yield offset, cast("list[bytes | None]", lines)
            offset += sum(map(len, lines)) + len(lines)
        if len(buf) > max_line_bytes:
            yield offset, [None]
            offset += len(buf)
            buf = b""
            skipping = True


def iter_lines(fh: BinaryIO, max_line_bytes: int) -> Iterator[tuple[int, bytes]]:
    """``(offset, line)`` for every non-empty line of ``iter_line_chunks``, with
    ``OVERSIZED`` in place of a line over ``max_line_bytes``."""
    for offset, lines in iter_line_chunks(fh, max_line_bytes):
        for line in lines:
            if line is None:
                yield offset, OVERSIZED
                break
            if line:
                yield offset, line
            offset += len(line) + 1


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
