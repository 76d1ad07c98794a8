"""Model-based test of the tailer (Vector's quickcheck interpreter, as Hypothesis).

A writer appends, writes half lines, rotates by rename, truncates, copytruncates,
deletes and recreates the file; the reader is killed (state rolled back to its last
save, as the daemon's detectors are) and restarted. Invariant: the lines delivered,
after every full read, equal the complete lines written: each once, in order.

The reader follows the daemon's contract: it saves its state whenever the tailer
reports ``switched`` (the old file drained). Complete lines are lost only where every
tailer loses them: a truncation of lines never read, so truncating actions read first.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from smart_monitor.sources.tailer import Tailer


class Reader:
    """The daemon's use of the tailer, without the pipeline."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tailer = Tailer(path, 1 << 16)
        self.out: list[bytes] = []
        self.saved: tuple[dict[str, Any] | None, int] = (None, 0)

    def read(self, limit: int | None = None) -> None:
        for n, (_, block) in enumerate(self.tailer.blocks(), 1):
            self.out.extend(line for line in block if line is not None)  # none is oversized
            self.tailer.commit()  # handled: as the daemon, which may stop after any block
            if limit is not None and n >= limit:
                return
        if self.tailer.switched:
            self.tailer.switched = False
            self.save()
            self.read(limit)

    def save(self) -> None:
        self.saved = (json.loads(json.dumps(self.tailer.state_dict())), len(self.out))

    def kill_and_restart(self) -> None:
        self.tailer.close()
        state, n = self.saved
        del self.out[n:]
        self.tailer = Tailer(self.path, 1 << 16)
        if state is not None:
            self.tailer.load_state_dict(state)

    def holds(self) -> bool:
        """The tailer has the file now at the path open (so a rename cannot lose it)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        ident = self.tailer.identity
        return (
            self.tailer.fd is not None
            and ident is not None
            and (ident.dev, ident.ino) == (st.st_dev, st.st_ino)
        )


class TailerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tailer-model-"))
        self.path = self.dir / "metrics.jsonl"
        self.fd: int | None = None
        self.n = 0
        self.rotations = 0
        self.expected: list[bytes] = []
        self.partial: tuple[bytes, bytes] | None = None  # (line, its part not yet written)
        self.reader = Reader(self.path)

    def teardown(self) -> None:
        self.reader.tailer.close()
        if self.fd is not None:
            os.close(self.fd)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _write(self, data: bytes) -> None:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self.fd, data)

    def _line(self) -> bytes:
        self.n += 1
        return json.dumps({"step": self.n, "loss": 1.0 / self.n}).encode()

    def _abandon_writer(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = None
        self.partial = None  # the writer never finishes a line in a file it left

    @precondition(lambda self: self.partial is None)
    @rule(count=st.integers(1, 5))
    def write_lines(self, count: int) -> None:
        for _ in range(count):
            line = self._line()
            self._write(line + b"\n")
            self.expected.append(line)

    @precondition(lambda self: self.partial is None)
    @rule(cut=st.integers(1, 20))
    def write_partial(self, cut: int) -> None:
        line = self._line()
        self._write(line[:cut])
        self.partial = (line, line[cut:] + b"\n")

    @precondition(lambda self: self.partial is not None)
    @rule()
    def finish_partial(self) -> None:
        assert self.partial is not None
        line, rest = self.partial
        self._write(rest)
        self.partial = None
        self.expected.append(line)

    def _before_destruction(self) -> None:
        if not self.reader.holds():
            self.reader.read()

    def _after_destruction(self) -> None:
        """The daemon is woken by the event and drains the old file before anything
        else can happen; a kill in between loses what no tailer could keep."""
        self.reader.read()

    @precondition(lambda self: self.path.exists())
    @rule()
    def rotate_rename(self) -> None:
        self._before_destruction()
        self.rotations += 1
        os.rename(self.path, self.dir / f"metrics.jsonl.{self.rotations}")
        self._abandon_writer()
        self._after_destruction()

    @precondition(lambda self: self.path.exists())
    @rule()
    def delete(self) -> None:
        self._before_destruction()
        self.path.unlink()
        self._abandon_writer()
        self._after_destruction()

    @precondition(lambda self: self.path.exists() and self.partial is None)
    @rule(copy=st.booleans())
    def truncate(self, copy: bool) -> None:
        self.reader.read()  # lines never read are lost by any tailer
        if copy:
            shutil.copyfile(self.path, self.dir / "metrics.jsonl.copy")
        os.truncate(self.path, 0)
        self._after_destruction()

    @precondition(lambda self: self.fd is None)
    @rule()
    def recreate(self) -> None:
        self._write(b"")

    @rule(limit=st.one_of(st.none(), st.integers(1, 3)))
    def read(self, limit: int | None) -> None:
        self.reader.read(limit)

    @rule()
    def save(self) -> None:
        self.reader.save()

    @rule()
    def kill_and_restart(self) -> None:
        self.reader.kill_and_restart()

    @invariant()
    def delivered_is_a_prefix(self) -> None:
        out = self.reader.out
        assert out == self.expected[: len(out)]

    @rule()
    def full_read_delivers_everything(self) -> None:
        self.reader.read()
        assert self.reader.out == self.expected


TailerMachine.TestCase.settings = settings(
    max_examples=100, stateful_step_count=30, deadline=None, derandomize=False
)
test_tailer_model = TailerMachine.TestCase
