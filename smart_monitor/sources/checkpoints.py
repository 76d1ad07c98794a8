"""The index of the trainer's complete checkpoints.

A ``checkpoint-N`` folder counts once its marker file (``trainer_state.json``, which HF
Trainer writes last) parses and ``checkpoint-is-incomplete.txt`` is absent, or once its
contents have not changed for ``settle_seconds``; a single-file checkpoint (Lightning's
``epoch=0-step=100.ckpt``) once its size has settled. ``tmp-checkpoint-*`` never
matches the pattern. Steps order checkpoints, never mtimes (FAULTS.md #18).

The folder is listed again only when its ``stat`` says its entries may have changed
(``folder.py``): beside 20,000 checkpoints an idle scan costs one ``stat``, plus a
look at each checkpoint still being written (FAULTS.md #65).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from smart_monitor.config import CheckpointsConfig
from smart_monitor.sources.folder import FolderStamp

__all__ = ["Checkpoint", "CheckpointIndex", "pattern_regex"]

INCOMPLETE_MARKER = "checkpoint-is-incomplete.txt"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    name: str
    step: int
    path: Path


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """``checkpoint-{step}`` -> ``^checkpoint-(?P<step>\\d+)$``; ``{epoch}`` matches too.

    >>> bool(pattern_regex("epoch={epoch}-step={step}.ckpt").match("epoch=2-step=300.ckpt"))
    True
    >>> bool(pattern_regex("checkpoint-{step}").match("tmp-checkpoint-300"))
    False
    """
    parts = re.split(r"(\{step\}|\{epoch\})", pattern)
    body = "".join(
        "(?P<step>\\d+)" if p == "{step}" else "\\d+" if p == "{epoch}" else re.escape(p)
        for p in parts
    )
    return re.compile(f"^{body}$")


class CheckpointIndex:
    """``scan()`` returns the checkpoints that became complete since the last scan."""

    def __init__(
        self,
        root: Path | None,
        config: CheckpointsConfig,
        clock: Callable[[], float] = time.monotonic,
        scandir: Callable[[Path], Iterable[os.DirEntry[str]]] = os.scandir,
    ) -> None:
        self.root = root
        self.config = config
        self.clock = clock
        self.scandir = scandir  # injectable, like the clock (watchdog's polling emitter)
        self.regex = pattern_regex(config.pattern)
        self.complete: dict[int, Checkpoint] = {}
        self._pending: dict[str, tuple[tuple[tuple[str, int, int], ...], float]] = {}
        self.unreadable: dict[Path, str] = {}  # path -> why, while it stays so (#53)
        self.problems: list[tuple[Path, str]] = []  # newly unreadable: the engine logs each
        self.rotations = 0  # complete checkpoints gone since start: pins now hold bytes
        self._folder = FolderStamp(root) if root is not None else None
        self._incomplete: list[Checkpoint] = []  # listed, not complete yet: looked at again

    def scan(self) -> list[Checkpoint]:
        if self.root is None or self._folder is None:
            return []
        if not self._folder.changed():  # the same entries: only the unfinished ones move
            return self._check(self._incomplete, [])
        try:
            entries = list(self.scandir(self.root))
        except (FileNotFoundError, NotADirectoryError):
            self._forget_all()
            return []
        except OSError as exc:  # EACCES, EIO: said once; what it held cannot be pinned
            self._forget_all()
            self._unreadable({self.root: _why(exc)}, [self.root])
            return []
        seen: set[int] = set()
        todo: list[Checkpoint] = []
        top = self.root.resolve()
        for entry in entries:
            m = self.regex.match(entry.name)
            if m is None or (entry.is_symlink() and not _inside(Path(entry.path), top)):
                continue  # a link out of the run folder pins someone else's files (#46)
            step = int(m.group("step"))
            seen.add(step)
            if step not in self.complete:
                todo.append(Checkpoint(entry.name, step, Path(entry.path)))
        gone = [s for s in self.complete if s not in seen]
        for step in gone:
            del self.complete[step]  # rotated away by the trainer
        self.rotations += len(gone)
        self._folder.listed()
        return self._check(todo, [self.root])

    def _check(self, todo: list[Checkpoint], listed: list[Path]) -> list[Checkpoint]:
        """Which of ``todo`` are complete now; the rest wait for the next scan.
        ``listed``: the folder, when it was just listed (it is readable again)."""
        new: list[Checkpoint] = []
        bad: dict[Path, str] = {}
        waiting: list[Checkpoint] = []
        for ck in todo:
            try:
                complete = self._is_complete(ck)
            except OSError as exc:  # a trainer with umask 077: skip this one, go on (#53)
                bad[ck.path] = _why(exc)
                waiting.append(ck)
                continue
            if complete:
                self.complete[ck.step] = ck
                self._pending.pop(ck.name, None)
                new.append(ck)
            else:
                waiting.append(ck)
        self._incomplete = waiting
        self._unreadable(bad, [*listed, *(p for p in self.unreadable if p.parent == self.root)])
        return sorted(new, key=lambda c: c.step)

    def _forget_all(self) -> None:
        self.complete.clear()
        self._incomplete = []

    def _unreadable(self, found: dict[Path, str], scope: list[Path]) -> None:
        """Remember what cannot be read now; ``problems`` gets each path once, when it
        becomes unreadable (again), so the log says it once, not at every scan."""
        for path in scope:
            if path not in found:
                self.unreadable.pop(path, None)  # readable again, or gone
        for path, why in found.items():
            if path not in self.unreadable:
                self.problems.append((path, why))
            self.unreadable[path] = why

    def _is_complete(self, ck: Checkpoint) -> bool:
        path = ck.path
        if path.is_dir():
            if (path / INCOMPLETE_MARKER).exists():
                return False
            marker = path / self.config.marker
            if marker.is_file() and _parses(marker):
                return True
        return self._settled(ck)

    def _settled(self, ck: Checkpoint) -> bool:
        """True once the file set, sizes and mtimes are unchanged for settle_seconds."""
        try:
            sig = _signature(ck.path)
        except OSError:
            return False
        now = self.clock()
        old = self._pending.get(ck.name)
        if old is None or old[0] != sig:
            self._pending[ck.name] = (sig, now)
            return False
        return now - old[1] >= self.config.settle_seconds

    def newest_at_or_before(self, step: int) -> Checkpoint | None:
        best = [s for s in self.complete if s <= step]
        return self.complete[max(best)] if best else None

    def get(self, step: int) -> Checkpoint | None:
        return self.complete.get(step)

    def forget(self, step: int) -> None:
        self.complete.pop(step, None)
        if self._folder is not None:
            self._folder.forget()  # found again at the next listing, if it is still there


def _why(exc: OSError) -> str:
    return exc.strerror or repr(exc)


def _inside(link: Path, top: Path) -> bool:
    return link.resolve().is_relative_to(top)


def _parses(marker: Path) -> bool:
    if marker.suffix != ".json":
        return True
    try:
        json.loads(marker.read_bytes())
        return True
    except (OSError, ValueError):
        return False


def _signature(path: Path) -> tuple[tuple[str, int, int], ...]:
    if path.is_file():
        st = path.stat()
        return ((path.name, st.st_size, st.st_mtime_ns),)
    out = []
    for dirpath, _dirs, names in os.walk(path):
        for n in names:
            st = os.stat(os.path.join(dirpath, n), follow_symlinks=False)
            out.append((os.path.join(dirpath, n), st.st_size, st.st_mtime_ns))
    return tuple(sorted(out))
