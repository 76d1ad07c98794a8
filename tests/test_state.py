"""The state file survives every crash FAULTS.md #17 lists: torn, empty, NUL-filled."""

from __future__ import annotations

import math
import os
from pathlib import Path

from smart_monitor.outputs.state import StateStore


def test_round_trip_keeps_non_finite_numbers(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state")
    store.save({"a": 1, "x": [math.inf, 0.5], "n": {"k": "v"}})
    data, source = store.load()
    assert data == {"a": 1, "x": [math.inf, 0.5], "n": {"k": "v"}}
    assert source == "state.json"


def test_nothing_saved_loads_none(tmp_path: Path) -> None:
    assert StateStore(tmp_path).load() == (None, None)


def test_previous_state_is_kept(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save({"i": 1})
    store.save({"i": 2})
    assert store.load()[0] == {"i": 2}
    store.path.write_bytes(b"\0" * 512)  # NUL-filled after a power loss
    assert store.load() == ({"i": 1}, "state.json.prev")


def test_torn_and_empty_files_fall_back(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save({"i": 1})
    store.save({"i": 2})
    good = store.path.read_bytes()
    store.path.write_bytes(good[: len(good) // 2])  # torn
    assert store.load()[0] == {"i": 1}
    store.path.write_bytes(b"")
    store.prev.write_bytes(b"")
    assert store.load() == (None, None)


def test_valid_tmp_is_preferred_over_stable(tmp_path: Path) -> None:
    """A crash between the tmp file's fsync and its rename: the tmp file is newest."""
    store = StateStore(tmp_path)
    store.save({"i": 1})
    store.save({"i": 2})
    os.replace(store.path, store.tmp)
    store.save({"i": 1})  # stable now older than the tmp we put back below
    stale = store.path.read_bytes()
    store.save({"i": 3})
    os.replace(store.path, store.tmp)
    store.path.write_bytes(stale)
    assert store.load() == ({"i": 3}, "state.json.tmp")


def test_edited_content_is_refused(tmp_path: Path) -> None:
    """The hash catches a file that parses but is not what was written."""
    store = StateStore(tmp_path)
    store.save({"offset": 10})
    store.path.write_text(store.path.read_text().replace("10", "99"))
    assert store.load() == (None, None)


def test_torn_tmp_is_ignored(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.save({"i": 1})
    store.tmp.write_bytes(b'{"version": 1, "sha')
    assert store.load() == ({"i": 1}, "state.json")
