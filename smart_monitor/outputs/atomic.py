"""The one way a published file is written: to a temporary name beside it, synced,
renamed over it, and the folder synced, so a crash or a reader (a trainer polling for a
stop file, a browser, ``jq``) sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "write_atomic"]


def write_atomic(path: Path, data: bytes) -> Path:
    """Replace ``path`` with ``data``; raises OSError and leaves no temporary behind.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_atomic(Path(d) / "a.json", b"{}")
    ...     p.read_bytes(), sorted(x.name for x in Path(d).iterdir())
    (b'{}', ['a.json'])
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (the folder's entry, not only the file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
