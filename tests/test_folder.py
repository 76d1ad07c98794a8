"""``FolderStamp``: when a folder must be listed again (sources/folder.py)."""

from __future__ import annotations

import os
from pathlib import Path

from smart_monitor.sources.folder import RACY_NS, FolderStamp

S = 1_000_000_000


class Stat:
    """A folder's stat as the test says: inode, mtime and ctime in seconds."""

    def __init__(self) -> None:
        self.ino, self.mtime, self.ctime = 7, 100, 100
        self.fail = False

    def __call__(self, path: Path) -> os.stat_result:
        if self.fail:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return os.stat_result((0o40755, self.ino, 1, 2, 0, 0, 4096, 0, 0, 0,
                               self.mtime, self.mtime, self.ctime, self.mtime * S,
                               self.mtime * S, self.ctime * S))


def stamp(now: list[int]) -> tuple[FolderStamp, Stat]:
    st = Stat()
    return FolderStamp(Path("/run"), stat=st, now_ns=lambda: now[0]), st


def test_a_listed_folder_is_not_listed_again_until_it_changes() -> None:
    now = [200 * S]
    folder, st = stamp(now)
    assert folder.changed()
    folder.listed()
    assert not folder.changed() and not folder.changed()
    st.mtime = st.ctime = 300  # an entry made or removed
    assert folder.changed()
    folder.listed()
    st.ctime = 400  # chmod: it may have become unreadable
    assert folder.changed()
    folder.listed()
    st.ino = 8  # deleted and made again
    assert folder.changed()


def test_a_listing_taken_in_the_mtimes_own_tick_is_not_trusted() -> None:
    """An entry made just after that listing, in the same tick of a coarse clock,
    would leave the mtime as it was: such a listing is taken again until it is old."""
    now = [100 * S + RACY_NS - 1]
    folder, _ = stamp(now)
    assert folder.changed()
    folder.listed()
    assert folder.changed(), "a racy listing was trusted"
    now[0] = 100 * S + RACY_NS  # listed again, late enough now
    assert folder.changed()
    folder.listed()
    assert not folder.changed()


def test_a_failed_listing_is_taken_again() -> None:
    now = [200 * S]
    folder, st = stamp(now)
    assert folder.changed()  # the caller's listing fails: it calls no listed()
    assert folder.changed()
    folder.listed()
    st.fail = True
    assert folder.changed()
    st.fail = False
    folder.forget()
    assert folder.changed()
