"""The one JSONL line reader, for a finished file (``replay``, ``report``) and for the
live tailer alike; and HF ``trainer_state.json`` histories."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

__all__ = [
    "OVERSIZED", "Block", "LineSplitter", "iter_line_chunks", "iter_lines",
    "trainer_state_history",
]  # fmt: skip

OVERSIZED = b""  # yielded in place of a line longer than max_line_bytes
_CHUNK = 1 << 20

# consecutive lines from a byte offset: each takes ``len(line) + 1`` bytes; ``None``
# (a line over max_line_bytes) always ends its list
Block = tuple[int, list[bytes | None]]


class LineSplitter:
    """Bytes in, blocks of complete lines out, with the offset of each block's first
    line, so a consumer can tell every line's offset. A last line without its newline
    waits in ``buf`` (it may still be being written). Empty lines are kept: they count
    for the offsets. A line over ``max_line_bytes`` becomes ``None`` and its bytes are
    dropped as they stream past (memory stays bounded). A run of NUL bytes where a line
    starts (``copytruncate`` beside a writer without O_APPEND, FAULTS.md #7) is skipped,
    counted in ``nul_bytes`` and reported to ``on_nul(count, offset)``: the one place
    NUL bytes are stripped, for ``run`` and ``replay`` alike.

    >>> s = LineSplitter(8)
    >>> s.feed(b'{"a":1}\\n\\x00\\x00{"b":2}\\n{"c"')
    [(0, [b'{"a":1}']), (10, [b'{"b":2}'])]
    >>> s.offset, s.buf, s.nul_bytes
    (18, b'{"c"', 2)
    """

    def __init__(
        self, max_line_bytes: int, on_nul: Callable[[int, int], None] = lambda n, offset: None
    ) -> None:
        self.max_line_bytes = max_line_bytes
        self.on_nul = on_nul
        self.offset = 0  # of the start of ``buf``: the first byte not yet handed out
        self.buf = b""
        self.skipping = False  # discarding the rest of an oversized line
        self.nul_bytes = 0

    def reset(self, offset: int = 0, skipping: bool = False) -> None:
        self.offset, self.skipping, self.buf = offset, skipping, b""

    def feed(self, chunk: bytes) -> list[Block]:
        """The blocks that ``chunk`` completes; ``offset`` is past all of them."""
        if self.skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                self.offset += len(chunk)
                return []
            self.offset += nl + 1
            chunk = chunk[nl + 1 :]
            self.skipping = False
        data = self.buf + chunk if self.buf else chunk
        out: list[Block] = []
        if b"\x00" in data:
            buf = self._split_slowly(data, out)
        else:
            lines: list[bytes] = data.split(b"\n")
            buf = lines.pop()
            if lines and len(data) > self.max_line_bytes and (
                max(map(len, lines)) > self.max_line_bytes  # rare
            ):
                buf = self._split_slowly(data, out)
            elif lines:
                out.append((self.offset, cast("list[bytes | None]", lines)))
                self.offset += len(data) - len(buf)  # the lines and their newlines
        if len(buf) > self.max_line_bytes:
            out.append((self.offset, [None]))
            self.offset += len(buf)
            buf = b""
            self.skipping = True
        self.buf = buf
        return out

    def _split_slowly(self, buf: bytes, out: list[Block]) -> bytes:
        """Line by line, around NUL runs and oversized lines; returns the partial tail."""
        part: list[bytes | None] = []
        start = self.offset
        pos = 0
        while True:
            if buf.startswith(b"\x00", pos):
                end = len(buf) - len(buf[pos:].lstrip(b"\x00"))
                if part:
                    out.append((start, part))
                    part = []
                self.nul_bytes += end - pos
                self.offset += end - pos
                self.on_nul(end - pos, self.offset)
                pos, start = end, self.offset
            nl = buf.find(b"\n", pos)
            if nl < 0:
                break
            line = buf[pos:nl]
            self.offset += nl + 1 - pos
            pos = nl + 1
            if len(line) > self.max_line_bytes:
                part.append(None)
                out.append((start, part))
                part, start = [], self.offset
            else:
                part.append(line)
        if part:
            out.append((start, part))
        return buf[pos:]


def iter_line_chunks(
    fh: BinaryIO, max_line_bytes: int, on_nul: Callable[[int, int], None] | None = None
) -> Iterator[Block]:
    """Every block of complete lines of ``fh``, read to its end (see ``LineSplitter``)."""
    splitter = LineSplitter(max_line_bytes, *(() if on_nul is None else (on_nul,)))
    while chunk := fh.read(_CHUNK):
        yield from splitter.feed(chunk)


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
