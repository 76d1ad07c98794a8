"""The optional checkpoint scan (``[checkpoint_scan] enabled = true``).

Each new complete checkpoint's safetensors weights are read on one worker thread, so a
multi-GB scan never delays the records behind it; the engine collects finished scans
on its own thread, in checkpoint order, and feeds their triggers through the same
policy and snapshot path as every other detection:

- ``weights_nonfinite`` (critical): a tensor holds NaN or Inf;
- ``weight_norm_zscore_N``: the global weight norm jumped. Training moves the norm a
  little at every checkpoint, and by a drifting amount, so the score is the z of its
  relative change against the changes between earlier checkpoints, not of the norm.

Only safetensors files are scanned: the daemon never imports torch.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from smart_monitor.config import CheckpointScanConfig
from smart_monitor.forensics.inspection import Inspection, inspect_checkpoint
from smart_monitor.sources.checkpoints import Checkpoint
from smart_monitor.stats import RollingWindow
from smart_monitor.triggers import WEIGHT_NORM_ZSCORE, WEIGHTS_NONFINITE, Severity, Trigger

__all__ = ["CheckpointScanner", "ScanResult", "WeightScan"]


class WeightScan:
    """Scores one scanned checkpoint after another; pure, like every detector.

    >>> d = WeightScan(CheckpointScanConfig(warmup=3))
    >>> for step, norm in [(100, 50.0), (200, 50.5), (300, 51.0), (400, 51.4)]:
    ...     assert not d.update(step, norm, 0)
    >>> [t.name for t in d.update(500, 80.0, 2)]
    ['weights_nonfinite', 'weight_norm_zscore_547.17']
    """

    def __init__(self, config: CheckpointScanConfig) -> None:
        self.config = config
        self.window = RollingWindow(config.window)
        self.last: tuple[int, float] | None = None
        self.last_z: float | None = None

    def update(self, step: int, global_norm: float, nonfinite_tensors: int) -> list[Trigger]:
        if self.last is not None and step <= self.last[0]:
            return []  # already scored: a restarted daemon re-scans what it finds
        out: list[Trigger] = []
        if nonfinite_tensors:
            out.append(Trigger(
                WEIGHTS_NONFINITE, WEIGHTS_NONFINITE, Severity.CRITICAL, step,
                {"value": nonfinite_tensors, "tensors": nonfinite_tensors},
            ))
        last, self.last = self.last, (step, global_norm)
        if last is None or last[1] <= 0 or not math.isfinite(global_norm):
            return out
        change = (global_norm - last[1]) / last[1]
        if len(self.window) < self.config.warmup:
            self.window.add(step, change)
            return out
        z = (change - self.window.mean) / max(self.window.std, self.config.min_std)
        self.last_z = z
        if abs(z) <= self.config.threshold:
            self.window.add(step, change)
            return out  # a jump stays out of the baseline; the next change starts from it
        severity = Severity.CRITICAL if abs(z) > self.config.critical else Severity.WARNING
        details = {"z": z, "value": global_norm, "previous": last[1], "change": change}
        name = f"{WEIGHT_NORM_ZSCORE}_{z:.2f}"
        out.append(Trigger(WEIGHT_NORM_ZSCORE, name, severity, step, details))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": self.window.state_dict(),
            "last": list(self.last) if self.last else None,
            "last_z": self.last_z,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window.load_state_dict(state.get("window", {}))
        last = state.get("last")
        self.last = (int(last[0]), float(last[1])) if last else None
        self.last_z = state.get("last_z")


@dataclass(frozen=True, slots=True)
class ScanResult:
    """One finished scan: ``inspection`` or, when the weights could not be read (rotated
    away, no safetensors, truncated), ``error``."""

    checkpoint: Checkpoint
    inspection: Inspection | None
    error: str | None
    triggers: tuple[Trigger, ...] = ()

    def summary(self) -> dict[str, Any]:
        """What metadata.json keeps as the triggering ``metrics``."""
        ins = self.inspection
        out: dict[str, Any] = {"step": self.checkpoint.step, "checkpoint": self.checkpoint.name}
        if ins is not None:
            out |= {
                "global_norm": ins.global_norm,
                "parameters": ins.parameters,
                "nonfinite_tensors": ins.nonfinite[:20],
            }
        return out


def _scan(checkpoint: Checkpoint) -> Inspection:
    return inspect_checkpoint(checkpoint.path, formats=("safetensors",))


class CheckpointScanner:
    """One worker thread scans; ``collect`` (the engine's thread) scores, in order.

    The worker is a daemon thread, not an executor's: a stop gives up on a scan still
    reading a multi-GB checkpoint (FAULTS.md #63), and the process must not then wait
    for it at exit, as it would for a ``ThreadPoolExecutor``'s threads."""

    def __init__(self, config: CheckpointScanConfig) -> None:
        self.detector = WeightScan(config)
        self._jobs: queue.SimpleQueue[tuple[Checkpoint, Future[Inspection]] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._queue: deque[tuple[Checkpoint, Future[Inspection]]] = deque()

    def submit(self, checkpoint: Checkpoint) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="checkpoint-scan", daemon=True
            )
            self._thread.start()
        future: Future[Inspection] = Future()
        self._queue.append((checkpoint, future))
        self._jobs.put((checkpoint, future))

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            checkpoint, future = job
            if not future.set_running_or_notify_cancel():
                continue  # cancelled at stop before it began
            try:
                future.set_result(_scan(checkpoint))
            except Exception as exc:  # handed to collect(): logged there, never fatal
                future.set_exception(exc)

    @property
    def busy(self) -> bool:
        return bool(self._queue)

    def collect(self, wait: bool = False, timeout: float | None = None) -> list[ScanResult]:
        """The finished scans, oldest first, stopping at the first unfinished one (all
        of them with ``wait``, for at most ``timeout`` seconds in all) so that norms are
        compared in checkpoint order."""
        out = []
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue and (wait or self._queue[0][1].done()):
            ck, future = self._queue[0]
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            try:
                ins = future.result(left)
            except FutureTimeout:
                break  # still reading: left to close()
            except Exception as exc:  # a scan's failure is logged by the engine, never fatal
                self._queue.popleft()
                out.append(ScanResult(ck, None, f"{type(exc).__name__}: {exc}"))
                continue
            self._queue.popleft()
            fired = self.detector.update(ck.step, ins.global_norm, len(ins.nonfinite))
            out.append(ScanResult(ck, ins, None, tuple(fired)))
        return out

    def close(self) -> list[Checkpoint]:
        """End the worker; the checkpoints whose scan was given up (never waited for)."""
        abandoned = [ck for ck, _ in self._queue]
        for _, future in self._queue:
            future.cancel()  # one not begun never starts; one running is left to end
        self._queue.clear()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None
        return abandoned
