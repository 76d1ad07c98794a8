"""The JSONL tailer against real files: partial lines, identity, state round trips."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from smart_monitor.sources.tailer import Tailer


class Events:
    def __init__(self) -> None:
        self.names: list[str] = []

    def __call__(self, name: str, fields: Any) -> None:
        self.names.append(name)


def lines(t: Tailer) -> list[tuple[int, bytes | None]]:
    """The non-empty lines of ``t.blocks()`` with their offsets (None: oversized)."""
    out: list[tuple[int, bytes | None]] = []
    for offset, block in t.blocks():
        for line in block:
            if line != b"":
                out.append((offset, line))
            offset += len(line or b"") + 1
    return out


def read(t: Tailer) -> list[bytes | None]:
    return [line for _, line in lines(t)]


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def test_missing_file_is_waited_for_then_read_from_start(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "m.jsonl"
    t = Tailer(path, 1024)
    assert read(t) == [] and t.waiting
    path.parent.mkdir()
    append(path, b'{"a":1}\n')
    assert read(t) == [b'{"a":1}'] and not t.waiting


def test_partial_line_waits_for_its_newline(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append(path, b'{"step": 1}\n{"st')
    t = Tailer(path, 1024)
    assert read(t) == [b'{"step": 1}']
    assert t.offset == len(b'{"step": 1}\n')
    append(path, b'ep": 2}\n')
    assert read(t) == [b'{"step": 2}']


def test_offsets_name_each_line_start(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append(path, b"a\nbb\n\nccc\n")
    assert list(Tailer(path, 1024).blocks()) == [(0, [b"a", b"bb", b"", b"ccc"])]
    assert lines(Tailer(path, 1024)) == [(0, b"a"), (2, b"bb"), (6, b"ccc")]


def test_state_round_trip_resumes_after_the_last_line_handed_out(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    # an oversized line splits one read into two blocks
    rest = b"".join(b'{"i":%d}\n' % i for i in range(1, 10))
    append(path, b'{"i":0}\n' + b"x" * 2000 + b"\n" + rest)
    t = Tailer(path, 1024)
    it = t.blocks()
    got = next(it)[1]  # a reader that stops between the two blocks of one read
    assert got == [b'{"i":0}', None]
    assert t.offset == 0  # handed out, not yet handled: a save now would read it again
    t.commit()  # handled
    state = json.loads(json.dumps(t.state_dict()))
    t.close()
    t2 = Tailer(path, 1024)
    t2.load_state_dict(state)
    got += read(t2)
    assert got == [b'{"i":0}', None] + [b'{"i":%d}' % i for i in range(1, 10)]


def test_restore_onto_a_different_file_reads_it_from_start(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append(path, b'{"i":0}\n{"i":1}\n')
    t = Tailer(path, 1024)
    read(t)
    state = t.state_dict()
    t.close()
    path.unlink()
    append(path, b'{"j":0}\n{"j":1}\n{"j":2}\n')
    ev = Events()
    t2 = Tailer(path, 1024, ev)
    t2.load_state_dict(state)
    assert read(t2) == [b'{"j":0}', b'{"j":1}', b'{"j":2}']
    assert "Metrics file changed while stopped" in ev.names


def test_same_content_under_a_new_inode_resumes(tmp_path: Path) -> None:
    """An atomic replace that kept the old lines is the same stream: no re-read."""
    path = tmp_path / "m.jsonl"
    append(path, b'{"i":0}\n{"i":1}\n')
    t = Tailer(path, 1024)
    read(t)
    state = t.state_dict()
    t.close()
    tmp = tmp_path / "new"
    tmp.write_bytes(b'{"i":0}\n{"i":1}\n{"i":2}\n')
    os.replace(tmp, path)
    t2 = Tailer(path, 1024)
    t2.load_state_dict(state)
    assert read(t2) == [b'{"i":2}']


def test_oversized_line_is_reported_once_and_skipped_streaming(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    t = Tailer(path, 1024)
    append(path, b"x" * 3000)
    assert list(t.blocks()) == [(0, [None])]
    append(path, b"x" * 3000 + b'\n{"ok":1}\n')
    assert read(t) == [b'{"ok":1}']
    assert t.offset == path.stat().st_size


def test_oversized_complete_line_in_one_chunk(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    append(path, b"y" * 2000 + b'\n{"ok":1}\n')
    assert read(Tailer(path, 1024)) == [None, b'{"ok":1}']


def test_crlf_and_blank_lines_are_handed_out_as_read(tmp_path: Path) -> None:
    """Blank lines count for the offsets; the engine skips them, as in a replay."""
    path = tmp_path / "m.jsonl"
    append(path, b'{"a":1}\r\n\r\n  \n{"b":2}\n')
    assert read(Tailer(path, 1024)) == [b'{"a":1}\r', b"\r", b"  ", b'{"b":2}']


def test_a_refused_stat_waits_and_says_so_once(tmp_path: Path) -> None:
    """Running as root, a test cannot be refused by the file system: the stat is injected."""
    path = tmp_path / "m.jsonl"
    append(path, b'{"a":1}\n')
    refuse = True

    def stat(p: Path) -> os.stat_result:
        if refuse:
            raise PermissionError(13, "Permission denied", str(p))
        return os.stat(p)

    ev = Events()
    t = Tailer(path, 1024, ev, stat=stat)
    assert read(t) == [] and read(t) == [] and t.waiting
    assert ev.names.count("Metrics file unreadable") == 1
    refuse = False
    assert read(t) == [b'{"a":1}']
