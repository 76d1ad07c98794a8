"""TensorBoard event files (``events.out.tfevents.*``) as records, read with
tensorboard's own record reader (the ``[tensorboard]`` extra).

A file is a run of length-prefixed, CRC-checked records, one ``Event`` each; a scalar
event carries ``(step, tag, value)``. Trainers write one scalar per call, so the
scalars of one step are gathered and become one entry once the step is complete: when
the first scalar of another step arrives, or when the file has been quiet for
``quiet_seconds`` (the last step of a run, or a trainer that stalled).

The reader verifies both CRCs of every record. A record cut short (a trainer killed
mid-write, or a write still under way) is waited for: the reader keeps its partial
bytes and completes the record when the rest arrives. A record whose CRC fails is
corruption (a bit flip, a NUL hole a crash left): it is reported once and the reader
goes on at the next valid record, so a NaN logged after the hole is still seen, where
TensorFlow's reader gives up on the rest of the file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.util import tensor_util

from smart_monitor.series import SeriesBook, other_axis
from smart_monitor.sources.steps import split_step

__all__ = ["EventFileFollower", "EventFileReader", "StepGatherer", "scalars", "split_step"]

EventHandler = Callable[[str, Mapping[str, Any]], None]
Malformed = Callable[[str, str, "int | None"], None]  # Engine.malformed: counted, logged

_BATCH = 4096  # events per read(): a backlog is read in slices
_FRAME = 16  # length (8) + its CRC (4) before the data, the data's CRC (4) after
_READ_AHEAD = 1 << 16  # bytes read at once: a backlog is not two reads per record

def scalars(raw: bytes) -> tuple[int, list[tuple[str, float]]]:
    """The step and the scalar values of one serialized ``Event`` (old-style
    ``simple_value`` or a one-element float tensor); other summaries are skipped."""
    event = event_pb2.Event.FromString(raw)
    out: list[tuple[str, float]] = []
    for v in event.summary.value:
        kind = v.WhichOneof("value")
        if kind == "simple_value":
            out.append((v.tag, float(v.simple_value)))
        elif kind == "tensor" and v.metadata.plugin_data.plugin_name in ("scalars", ""):
            array = tensor_util.make_ndarray(v.tensor)
            if array.size == 1 and array.dtype.kind in "fiu":
                out.append((v.tag, float(array.reshape(()))))
    return event.step, out


class EventFileReader:
    """The complete records of one event file, from the start: ``records()`` yields
    each record's bytes and leaves ``offset`` at its end. ``truncated`` is True while
    the file ends inside a record (waited for). A record whose length or data CRC
    fails starts a hole (``holes``: where each began); the reader then tries each
    later byte as a record start and goes on at the first whose length, length CRC
    and data CRC all check (TFRecord framing has no sync marker: the CRCs are the
    marker, a false match is one in 2**64)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._buf = b""  # file bytes from _buf_at on, read ahead
        self._buf_at = 0
        self.offset = 0
        self.truncated = False
        self.holes: list[int] = []
        self._scan = -1  # inside a hole: the next byte to try as a record start

    def _bytes(self, at: int, n: int) -> bytes:
        """Up to ``n`` file bytes at ``at`` (fewer at the end of the file)."""
        lo = at - self._buf_at
        if lo < 0 or lo + n > len(self._buf):
            self._buf = os.pread(self._fd, max(n, _READ_AHEAD), at)
            self._buf_at, lo = at, 0
        return self._buf[lo:lo + n]

    def _record_at(self, at: int) -> bytes | Literal[False] | None:
        """The data of the record at ``at``; False when its framing fails, None when
        the file ends before the record does."""
        head = self._bytes(at, 12)
        if len(head) < 12:
            return None
        if masked_crc32c(head[:8]) != struct.unpack("<I", head[8:])[0]:
            return False
        (length,) = struct.unpack("<Q", head[:8])
        end = at + 16 + length
        if end > self._buf_at + len(self._buf) and end > os.fstat(self._fd).st_size:
            return None  # never a read of a length the file does not hold
        body = self._bytes(at + 12, length + 4)
        if len(body) < length + 4:
            return None
        data = body[:length]
        return data if masked_crc32c(data) == struct.unpack("<I", body[length:])[0] else False

    def _next_candidate(self, at: int) -> int:
        """The first position from ``at`` whose length could frame a record: runs of
        NUL bytes (a hole the file system left) and lengths of 4 GiB and more are
        passed over without a CRC."""
        while True:
            window = self._bytes(at, _READ_AHEAD)
            if len(window) < 12:
                return at
            nuls = len(window) - len(window.lstrip(b"\0"))
            if nuls >= 12:  # twelve NULs are no header (the CRC of a zero length is not 0)
                at += nuls - 11
                continue
            for i in range(len(window) - 11):
                if window[i + 4:i + 8] == b"\0\0\0\0":
                    return at + i
            at += len(window) - 11

    def records(self) -> Iterator[bytes]:
        while True:
            at = self.offset if self._scan < 0 else self._next_candidate(self._scan)
            got = self._record_at(at)
            if got is None:  # cut short: the rest is waited for
                cut = len(self._bytes(at, 12))  # 0: the end of the file, nothing cut
                self.truncated = cut == 12 or (cut > 0 and self._scan < 0)
                if self._scan >= 0:
                    self._scan = at
                return
            if got is False:
                if self._scan < 0:
                    self.holes.append(at)
                self._scan = at + 1
                continue
            self.offset, self._scan, self.truncated = at + len(got) + _FRAME, -1, False
            yield got

    def skip_to(self, offset: int) -> bool:
        """Read past the records before ``offset`` (a resume): True when a record ends
        exactly there (the file is the one the offset was saved for)."""
        for _ in self.records():
            if self.offset >= offset:
                break
        return self.offset == offset

    def close(self) -> None:
        os.close(self._fd)


class StepGatherer:
    """Scalars in, one entry per complete step out (``{"step": S, key: value, ...}``).

    Train, eval and HF's end-of-training summary keys of one step become separate
    entries, as the JSONL of the same run has them (an eval at step S is not a train
    record at S). A tag's key is the run's ``SeriesBook``'s, for a file in folder
    ``place``. ``start`` is the file offset of the first scalar not yet in an entry
    given out: where a restart must read from. A series on another step axis (Keras's
    ``evaluation_loss_vs_iterations``) is noted in the book, never in an entry: its
    iteration steps among the epoch steps would read as a step counter going back.

    >>> g = StepGatherer(SeriesBook({}))
    >>> g.add(0, 10, [("train/loss", 2.0), ("train/learning_rate", 1e-3)], 50)
    []
    >>> g.add(50, 10, [("eval/loss", 2.5)], 80)
    []
    >>> g.add(80, 20, [("train/loss", 1.9)], 100)
    [{'step': 10, 'loss': 2.0, 'learning_rate': 0.001}, {'step': 10, 'eval_loss': 2.5}]
    >>> g.start, g.flush(), g.start
    (80, [{'step': 20, 'loss': 1.9}], 100)
    """

    def __init__(self, book: SeriesBook, place: str = "") -> None:
        self.book = book
        self.place = place
        self._keys: dict[str, str] = {}  # tag -> key, memoised: tags repeat every step
        self._version = book.version
        self.step: int | None = None
        self.values: dict[str, float] = {}
        self.start = 0
        self._end = 0

    def add(
        self, offset: int, step: int, values: list[tuple[str, float]], end: int
    ) -> list[dict[str, Any]]:
        """The scalars of one event (at ``offset``, ending at ``end``); returns the
        entries of the step this one completes."""
        out: list[dict[str, Any]] = []
        keys = self._keys
        if self._version != self.book.version:  # a plainer main series took over
            keys.clear()
            self._version = self.book.version
        if values and any(other_axis(t) for t, _ in values):
            aside = [(t, v) for t, v in values if other_axis(t)]
            self.book.observe({self._key(t): v for t, v in aside})
            values = [(t, v) for t, v in values if not other_axis(t)]
        if not values:
            if self.step is None:
                self.start = end  # nothing pending: an event without scalars is done
            self._end = end
            return out
        if self.step is not None and step != self.step:
            out = self.flush()
            self.start = offset
        if self.step is None:
            self.step = step
            self.start = offset
        for tag, value in values:
            self.values[keys.get(tag) or self._key(tag)] = value
        self._end = end
        return out

    def _key(self, tag: str) -> str:
        key = self._keys.get(tag)
        if key is None:
            key = self._keys[tag] = self.book.key(tag, self.place)
        return key

    def flush(self) -> list[dict[str, Any]]:
        """The pending step as its entries (at a quiet period or the end of a replay)."""
        step, values = self.step, self.values
        self.step, self.values, self.start = None, {}, self._end
        if step is None:
            return []
        return split_step(step, values)


class EventFileFollower:
    """One event file followed live: ``read()`` gives the entries of the steps
    completed since the last call, ``flush()`` the pending one. The state is the
    file's identity and the offset of the first event not yet in an entry given out,
    so a restart reads the pending step again and loses nothing."""

    def __init__(
        self,
        path: Path,
        book: SeriesBook,
        place: str,
        event: EventHandler,
        malformed: Malformed,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = path
        self.book = book
        self.place = place
        self.event = event
        self.malformed = malformed
        self.truncations = 0
        self._open()
        if state and (state.get("dev"), state.get("ino")) == self.ident:
            offset = int(state.get("offset", 0))
            if self.reader.skip_to(offset):
                self.gather.start = self.gather._end = offset
                self._holes_said = len(self.reader.holes)  # said before the stop
                return
            self.event("Metrics file changed while stopped", {"path": str(path)})
            self._open()

    def _open(self) -> None:
        st = os.stat(self.path)
        self.ident = (st.st_dev, st.st_ino)
        self.reader = EventFileReader(str(self.path))
        self.gather = StepGatherer(self.book, self.place)
        self._waited_at = -1
        self._holes_said = 0

    @property
    def pending(self) -> bool:
        return self.gather.step is not None

    @property
    def position(self) -> int:
        return self.reader.offset

    @property
    def mid_record(self) -> bool:
        """The file ends inside a record: the writer is mid-write, and that record may
        hold more scalars of the pending step."""
        return self.reader.truncated

    def flush(self) -> list[dict[str, Any]]:
        return self.gather.flush()

    def state_dict(self) -> dict[str, Any]:
        dev, ino = self.ident
        return {"dev": dev, "ino": ino, "offset": self.gather.start}

    def read(self) -> list[dict[str, Any]]:
        st = os.stat(self.path)
        out: list[dict[str, Any]] = []
        if (st.st_dev, st.st_ino) != self.ident or st.st_size < self.reader.offset:
            why = "replaced" if (st.st_dev, st.st_ino) != self.ident else "truncated"
            self.event(f"Metrics file {why}", {"path": str(self.path)})
            out = self.gather.flush()  # the old file's last step is complete
            self.reader.close()
            self._open()
        reader, add = self.reader, self.gather.add
        for n, raw in enumerate(reader.records(), 1):
            step, values = scalars(raw)
            out += add(reader.offset - len(raw) - _FRAME, step, values, reader.offset)
            if n == _BATCH:
                return out  # the caller comes back for the rest: a backlog in slices
        for at in reader.holes[self._holes_said:]:  # each hole counted once
            self.malformed("crc_mismatch", f"{self.path}: bad CRC at offset {at}, read on at "
                           "the next valid record", at)
        self._holes_said = len(reader.holes)
        if reader.truncated and self._waited_at != reader.offset:
            self._waited_at = reader.offset  # said once per record waited for
            self.truncations += 1
            self.event("Waiting for truncated event record", {
                "path": str(self.path), "offset": reader.offset, "count": self.truncations,
            })
        return out

    def close(self) -> None:
        self.reader.close()
