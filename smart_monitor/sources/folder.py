"""Whether a folder's entries may have changed since it was last listed, for one
``stat`` (FAULTS.md #65: listing 20,000 checkpoint folders or snapshots at every
reconciliation costs a share of a core on its own).

Creating, removing or renaming an entry moves the folder's mtime (and ctime); a
``chmod`` that makes it unreadable moves its ctime; a folder deleted and made again
has a new inode. So while ``(device, inode, mtime, ctime)`` stays the same, the last
listing still holds, whatever events were lost (#20) or never sent (a writer on
another node, #30, whose change shows once the client's attribute cache expires).

One exception, the one git calls a racy timestamp: a file system stamps times at a
granularity (a clock tick, a second on some servers, 2 s on FAT), so an entry made in
the same tick as the listing's mtime, just after the listing, leaves the mtime where
it was. A listing taken less than ``RACY_NS`` after the folder's mtime is therefore
not trusted: the folder is listed again at the next look, until its mtime is old.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["RACY_NS", "FolderStamp"]

RACY_NS = 2_000_000_000  # FAT's 2 s granularity, the coarsest of the usual ones

Key = tuple[int, int, int, int]


class FolderStamp:
    """``changed()`` says whether ``path`` must be listed again; ``listed()`` records
    that a listing taken after that ``changed()`` succeeded. A failed listing is
    simply not recorded: the next look lists again."""

    def __init__(
        self, path: Path, stat: Callable[[Path], os.stat_result] = os.stat,
        now_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.path = path
        self.stat = stat
        self.now_ns = now_ns
        self._trusted: Key | None = None  # the folder as the last trusted listing saw it
        self._looked: tuple[Key, int] | None = None  # the last stat, and when it was taken

    def changed(self) -> bool:
        try:
            st = self.stat(self.path)
        except OSError:  # gone, or its parent unreadable: the listing will say which
            self._looked = None
            return True
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        self._looked = (key, self.now_ns())  # taken before the listing that may follow
        return key != self._trusted

    def listed(self) -> None:
        looked = self._looked
        if looked is None:
            self._trusted = None
            return
        key, at = looked
        self._trusted = key if at - key[2] >= RACY_NS else None  # racy: look again

    def forget(self) -> None:
        """List again at the next look (the caller's own record was dropped)."""
        self._trusted = None
