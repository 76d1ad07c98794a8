"""``MetricsWriter``: the JSONL metrics file for a hand-written training loop.

The daemon reads the file while it grows, so every record is one complete line written
with a single ``write()`` on an ``O_APPEND`` descriptor: a reader never sees half a
line from us, and nothing waits in a buffer when the trainer dies. NaN and infinities
are written as the bare ``NaN``/``Infinity`` tokens ``json.dumps`` emits, which the
daemon reads as non-finite numbers (a NaN loss is exactly what it must see).

In a distributed job only global rank 0 writes: every rank computes the same logged
values, and one file per job is what the daemon follows.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["MetricsWriter", "global_rank"]


def global_rank() -> int:
    """This process's global rank: torch.distributed's when it is initialised (looked
    up without importing torch), else ``RANK``, else ``LOCAL_RANK``, else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value is not None and value.strip().lstrip("-").isdigit():
            return int(value)
    return 0


def _plain(value: Any) -> Any:
    """Tensors and numpy scalars become Python numbers; containers are walked."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", 0) == 0:
        return item()
    return value


class MetricsWriter:
    """Append records to ``path``, one JSON object per line, flushed as written.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
    >>> with MetricsWriter(path, rank=0) as w:
    ...     w.log(10, loss=float("nan"), learning_rate=1e-4)
    >>> path.read_text()
    '{"step": 10, "loss": NaN, "learning_rate": 0.0001}\\n'
    """

    def __init__(self, path: str | os.PathLike[str], *, rank: int | None = None) -> None:
        self.path = Path(path)
        self.enabled = (global_rank() if rank is None else rank) == 0
        self._fd: int | None = None

    def log(self, step: int, **metrics: Any) -> None:
        """One train or eval record: ``log(100, loss=0.7, learning_rate=3e-4)``."""
        self.write({"step": int(step), **metrics})

    def log_examples(self, step: int, examples: Iterable[Mapping[str, Any]]) -> None:
        """Prediction examples (``prompt``, ``golden_answer``, ``model_answer``, and
        ``loss``; ``matches`` is computed by the daemon when missing), one line each."""
        for example in examples:
            self.write({"step": int(step), **example})

    def write(self, record: Mapping[str, Any]) -> None:
        """Any record, as one line; a no-op on ranks other than 0."""
        if not self.enabled:
            return
        data = (json.dumps(_plain(record)) + "\n").encode()
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        view = memoryview(data)
        while view:  # a regular file takes it in one write; a short write is finished
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
