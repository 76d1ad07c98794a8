"""Follow the trainer's growing JSONL metrics file, in bytes, without ever losing a line.

A line is handed out only once its newline arrives (a trainer's ``write()`` may stop
mid-line), and the saved offset is always the start of the first line not yet handed
out, so a restart completes a partial line exactly once (FAULTS.md #2, #3).

The file's identity is its device, inode and the hash of its first line, plus a hash
of the bytes just before the offset (Fluent Bit's offset marker). They tell apart what
a path alone cannot: truncation in place (#5), truncation regrown past the offset or a
reused inode (#6), ``copytruncate`` with a writer that leaves a NUL hole (#7),
replacement by rename (#8) and deletion then re-creation (#9). A missing file is
waited for and read from its first byte (#1).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smart_monitor.sources.files import Block, LineSplitter

__all__ = ["Identity", "Tailer"]

_CHUNK = 1 << 20
_MARK = 64  # bytes before the offset whose hash must still match (offset marker)
_HEAD_MAX = 4096  # the first line's hash covers at most this many bytes
_TRIES = 3  # a block whose handling failed this often is skipped (said), not retried
# A file whose mtime is this recent may have changed again within the clock's
# granularity (git's "racy" index entries): then size and mtime prove nothing.
_RACY_NS = 100_000_000


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the file is: ``head`` is the hash of its first line, ``""`` until it has one."""

    dev: int
    ino: int
    head: str


class Tailer:
    """``blocks()`` yields the new complete lines as ``LineSplitter`` blocks (what one
    read returned, often one line), and ``offset`` moves past a block once it is
    handled: when the reader asks for the next one, or calls ``commit()`` (a reader
    that stops after a block). A block whose handling raised stays at ``offset``, is
    given again at the next ``blocks()``, and after ``_TRIES`` failures is skipped
    with a ``Skipped lines after errors`` event: nothing lost silently, no stall.

    ``event(name, fields)`` reports what a reader of the log wants to know: truncation,
    replacement, skipped NUL bytes, a line dropped unterminated.
    """

    def __init__(
        self,
        path: Path,
        max_line_bytes: int,
        event: Callable[[str, Mapping[str, Any]], None] = lambda name, fields: None,
        stat: Callable[[Path], os.stat_result] = os.stat,
    ) -> None:
        self.path = path
        self.stat = stat  # injectable, as watchdog's polling emitter does: a test can
        # refuse access, which a test running as root cannot get from the file system
        self.max_line_bytes = max_line_bytes
        self.event = event
        self.fd: int | None = None
        self.identity: Identity | None = None
        self.splitter = LineSplitter(max_line_bytes, self._skipped_nuls)
        self._pending: deque[Block] = deque()  # read, not yet handed out
        self.switched = False  # the file was replaced or deleted; the reader resets it
        self._gone = False
        self._refused = False
        self._seen: tuple[int, int] | None = None  # (size, mtime) last read to the end
        self._restored: dict[str, Any] | None = None
        self._tried_at, self._tries = -1, 0  # the block last given out, and how often

    def commit(self) -> None:
        """The block last given out is handled: ``offset`` moves past it."""
        if self._pending:
            self._pending.popleft()
        self._tried_at = -1

    @property
    def offset(self) -> int:
        """The start of the first line not yet handed out."""
        return self._pending[0][0] if self._pending else self.splitter.offset

    # -- state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._restored is not None:  # not yet applied (the file is missing): keep it
            return dict(self._restored)
        ident = self.identity
        return {
            "path": str(self.path),
            "dev": ident.dev if ident else None,
            "ino": ident.ino if ident else None,
            "head": ident.head if ident else None,
            "offset": self.offset,
            "mark": self._mark_hash(self.offset) if self.fd is not None else None,
            "skipping": self.splitter.skipping and not self._pending,
            "nul_bytes": self.splitter.nul_bytes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Takes effect at the next ``blocks()``, once the file at the path is checked
        to be the one the state describes; otherwise that file is read from 0."""
        self._restored = dict(state)
        self.splitter.nul_bytes = int(state.get("nul_bytes", 0))

    @property
    def waiting(self) -> bool:
        """True while no file is at the path (the daemon reports STATUS=waiting)."""
        return self.fd is None or self._gone

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    # -- reading --------------------------------------------------------------------
    def blocks(self) -> Iterator[Block]:
        try:
            st = self.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            st = None
        except PermissionError as exc:
            self._denied(exc)
            st = None
        if self.fd is not None:
            assert self.identity is not None
            if st is not None and (st.st_dev, st.st_ino) == (self.identity.dev, self.identity.ino):
                seen = (st.st_size, st.st_mtime_ns)
                settled = time.time_ns() - st.st_mtime_ns > _RACY_NS
                if seen == self._seen and settled and not self._pending:
                    return  # nothing new: one stat is all a poll costs
                if self._changed_in_place(st.st_size):
                    self._reopen("truncated")
                    return
                yield from self._read()
                self._seen = seen  # read to the end (a reader that stops early skips this)
                return
            # deleted, or replaced by rename: what the old file still holds comes first
            yield from self._read()
            if st is not None:
                self._reopen("replaced")
            elif not self._gone:  # drained: a restart must not wait for the old offset
                self._gone = self.switched = True
                self.event("Metrics file deleted", {"path": str(self.path)})
            return
        if st is not None:
            self._reopen(None)
            if self.fd is not None:
                yield from self._read()

    def _changed_in_place(self, size: int) -> bool:
        """Truncated below what was read, or truncated and regrown past it (the first
        line differs: a copytruncate's NUL hole, or a new run's first step)."""
        if size < self._read_pos():
            return True
        ident = self.identity
        assert ident is not None
        return bool(ident.head) and self._head_hash() != ident.head

    def _reopen(self, why: str | None) -> None:
        """Open the file now at the path. After a truncation or a replacement the reader
        gets no line of the new file in this ``blocks()`` and ``switched`` is set: the
        daemon saves its state at that boundary (the old file drained, the new one at
        0), so a kill after it neither resumes into the old identity nor loses lines."""
        self._drop_partial()
        self.close()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        except PermissionError as exc:  # retried at every wake-up until it is readable
            self._denied(exc)
            return
        st = os.fstat(fd)
        self.fd = fd
        self._gone = self._refused = False
        self._seen = None
        self.identity = Identity(st.st_dev, st.st_ino, self._head_hash())
        self.splitter.reset()
        restored, self._restored = self._restored, None
        if restored is not None and self._matches(restored, st.st_size):
            self.splitter.reset(int(restored["offset"]), bool(restored.get("skipping", False)))
            self.event("Resumed metrics file", {"path": str(self.path), "offset": self.offset})
        elif restored is not None and restored.get("head") is not None:
            self.event("Metrics file changed while stopped", {"path": str(self.path)})
        elif why is not None:
            self.event(f"Metrics file {why}", {"path": str(self.path)})
            self.switched = True
        else:
            self.event("Opened metrics file", {"path": str(self.path)})

    def _matches(self, state: Mapping[str, Any], size: int) -> bool:
        """The saved state describes this file: same first line, long enough, and the
        bytes before the saved offset unchanged. A new inode with the same content (an
        atomic replace that kept the old lines) is the same file for our purpose."""
        ident = self.identity
        assert ident is not None
        offset = int(state.get("offset", 0))
        if state.get("head") is None or size < offset:
            return False
        if state["head"] != ident.head:
            return False
        return offset == 0 or state.get("mark") == self._mark_hash(offset)

    def _head_hash(self) -> str:
        assert self.fd is not None
        head = os.pread(self.fd, _HEAD_MAX, 0)
        nl = head.find(b"\n")
        if nl < 0 and len(head) < _HEAD_MAX:
            return ""  # no complete first line yet
        return _hash(head[: nl + 1] if nl >= 0 else head)

    def _mark_hash(self, offset: int) -> str:
        assert self.fd is not None
        start = max(0, offset - _MARK)
        return _hash(os.pread(self.fd, offset - start, start))

    def _read(self) -> Iterator[Block]:
        """Every block of complete lines from the read position to the end of the file;
        the blocks of one read are queued first, so a reader that stops between two
        of them loses nothing."""
        assert self.fd is not None and self.identity is not None
        if not self.identity.head:
            head = self._head_hash()
            if head:
                self.identity = Identity(self.identity.dev, self.identity.ino, head)
        while True:
            while self._pending:
                block = self._pending[0]
                if self._gave_up(block):
                    continue
                yield block
                if self._pending and self._pending[0] is block:  # the reader came back
                    self.commit()  # for more: it handled this one
            chunk = os.pread(self.fd, _CHUNK, self._read_pos())
            if not chunk:
                return
            self._pending.extend(self.splitter.feed(chunk))

    def _gave_up(self, block: Block) -> bool:
        """Count the times ``block`` is given out; past ``_TRIES`` drop it, said."""
        if block[0] != self._tried_at:
            self._tried_at, self._tries = block[0], 0
        self._tries += 1
        if self._tries <= _TRIES:
            return False
        self._pending.popleft()
        self.event("Skipped lines after errors", {"offset": block[0], "lines": len(block[1])})
        return True

    def _skipped_nuls(self, count: int, offset: int) -> None:
        self.event("Skipped NUL bytes", {"count": count, "offset": offset})

    def _drop_partial(self) -> None:
        """An unterminated last line of a file that is gone or truncated can never be
        completed (FAULTS.md #4): say so instead of guessing."""
        left = len(self.splitter.buf)
        if left and self.fd is not None:
            self.event(
                "Dropped unterminated line", {"bytes": left, "offset": self.splitter.offset}
            )
        self._pending.clear()
        self.splitter.reset()

    def _denied(self, exc: OSError) -> None:
        if not self._refused:  # once, not at every retry
            self._refused = True
            self.event("Metrics file unreadable", {"path": str(self.path), "error": str(exc)})

    def _read_pos(self) -> int:
        return self.splitter.offset + len(self.splitter.buf)
