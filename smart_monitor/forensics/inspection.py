"""What ``smart-monitor inspect`` reports about a checkpoint: parameter count, the
tensors holding NaN/Inf and how many, global and per-layer L2 norms, and against
another checkpoint the layers that moved most (relative change).

Every figure is a sum over chunks of one tensor at a time, so memory stays bounded by
``tensors.CHUNK`` whatever the checkpoint's size. Norms count finite values only: one
NaN must not hide how large the rest of the layer is; the NaN is reported on its own.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smart_monitor.forensics.tensors import (
    CheckpointError,
    TensorFile,
    checkpoint_files,
    float_chunks,
    iter_tensors,
)

__all__ = [
    "Comparison",
    "Inspection",
    "LayerChange",
    "TensorStats",
    "compare_checkpoints",
    "format_text",
    "inspect_checkpoint",
    "layer_of",
]

_INDEX = re.compile(r"^\d+$")


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: up to its first numeric part (a block of a
    stack), else its module.

    >>> layer_of("transformer.h.11.attn.c_attn.weight"), layer_of("transformer.wte.weight")
    ('transformer.h.11', 'transformer.wte')
    """
    parts = name.split(".")
    for i, p in enumerate(parts):
        if _INDEX.match(p):
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


@dataclass(frozen=True, slots=True)
class TensorStats:
    name: str
    dtype: str
    shape: tuple[int, ...]
    numel: int
    nan: int
    inf: int
    sumsq: float  # of the finite values

    @property
    def norm(self) -> float:
        return math.sqrt(self.sumsq)


def tensor_stats(t: TensorFile) -> TensorStats:
    nan = inf = 0
    sumsq = 0.0
    if t.is_float:
        for c in float_chunks(t):
            s = float(np.dot(c, c))
            if not math.isfinite(s):  # NaN and Inf propagate: count them only then
                finite = np.isfinite(c)
                nan += int(np.isnan(c).sum())
                inf += int(np.isinf(c).sum())
                c = c[finite]
                s = float(np.dot(c, c))
            sumsq += s
    return TensorStats(t.name, t.dtype, t.shape, t.numel, nan, inf, sumsq)


@dataclass(frozen=True, slots=True)
class Inspection:
    path: str
    format: str
    files: list[str]
    bytes: int
    parameters: int  # elements of floating-point tensors
    tensors: int
    global_norm: float
    nonfinite: list[dict[str, Any]]  # name, dtype, shape, nan, inf
    layers: dict[str, float]  # layer -> L2 norm, in checkpoint order
    skipped: list[str] = field(default_factory=list)  # dtypes numpy cannot reduce (F8)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_checkpoint(path: Path, formats: Iterable[str] = ("safetensors", "torch")) -> Inspection:
    """Read every tensor of the checkpoint once. ``formats`` limits what may be opened:
    the daemon's scan passes ``("safetensors",)`` so that it never imports torch."""
    fmt, files = checkpoint_files(path)
    if fmt not in formats:
        raise CheckpointError(f"{path}: {fmt} weights are not scanned here")
    params = count = 0
    total = 0.0
    nonfinite: list[dict[str, Any]] = []
    layer_sq: dict[str, float] = {}
    skipped: list[str] = []
    for t in iter_tensors(files, fmt):
        count += 1
        if t.unreadable:
            skipped.append(t.name)
            continue
        s = tensor_stats(t)
        if not t.is_float:
            continue
        params += s.numel
        total += s.sumsq
        layer = layer_of(s.name)
        layer_sq[layer] = layer_sq.get(layer, 0.0) + s.sumsq
        if s.nan or s.inf:
            nonfinite.append({
                "name": s.name, "dtype": s.dtype, "shape": list(s.shape),
                "nan": s.nan, "inf": s.inf,
            })
    return Inspection(
        path=str(path),
        format=fmt,
        files=[f.name for f in files],
        bytes=sum(f.stat().st_size for f in files),
        parameters=params,
        tensors=count,
        global_norm=math.sqrt(total),
        nonfinite=nonfinite,
        layers={k: math.sqrt(v) for k, v in layer_sq.items()},
        skipped=skipped,
    )


@dataclass(frozen=True, slots=True)
class LayerChange:
    layer: str
    relative: float  # ||a - b|| / ||b|| over the layer's tensors
    delta_norm: float
    base_norm: float


@dataclass(frozen=True, slots=True)
class Comparison:
    against: str
    changes: list[LayerChange]  # most moved first
    only_here: list[str]
    only_there: list[str]
    shape_mismatch: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_checkpoints(path: Path, other: Path) -> Comparison:
    """How far each layer of ``path`` moved from ``other``, most moved first."""
    fmt_b, files_b = checkpoint_files(other)
    base = {t.name: t for t in iter_tensors(files_b, fmt_b)}  # views only, nothing read
    fmt_a, files_a = checkpoint_files(path)
    delta_sq: dict[str, float] = {}
    base_sq: dict[str, float] = {}
    seen: set[str] = set()
    mismatch: list[str] = []
    only_here: list[str] = []
    for a in iter_tensors(files_a, fmt_a):
        b = base.get(a.name)
        if b is None:
            only_here.append(a.name)
            continue
        seen.add(a.name)
        if a.shape != b.shape or a.is_float != b.is_float:
            mismatch.append(a.name)
            continue
        if not a.is_float:  # integer buffers, and dtypes numpy cannot read
            continue
        d, n = _diff(a, b)
        layer = layer_of(a.name)
        delta_sq[layer] = delta_sq.get(layer, 0.0) + d
        base_sq[layer] = base_sq.get(layer, 0.0) + n
    changes = [
        LayerChange(k, _ratio(math.sqrt(delta_sq[k]), math.sqrt(base_sq[k])),
                    math.sqrt(delta_sq[k]), math.sqrt(base_sq[k]))
        for k in delta_sq
    ]
    changes.sort(key=lambda c: (-c.relative, c.layer))
    only_there = sorted(n for n in base if n not in seen)
    return Comparison(str(other), changes, only_here, only_there, mismatch)


def _diff(a: TensorFile, b: TensorFile) -> tuple[float, float]:
    """Sum of squared differences and of squares of ``b``, over finite pairs."""
    d = n = 0.0
    buf: np.ndarray[Any, np.dtype[np.float64]] | None = None
    for ca, cb in zip(float_chunks(a), float_chunks(b), strict=True):
        if buf is None:
            buf = np.empty(ca.shape[0], np.float64)
        diff = np.subtract(ca, cb, out=buf[: ca.shape[0]])
        dd, nn = float(np.dot(diff, diff)), float(np.dot(cb, cb))
        if not (math.isfinite(dd) and math.isfinite(nn)):
            ok = np.isfinite(diff)
            diff, cb = diff[ok], cb[ok]
            dd, nn = float(np.dot(diff, diff)), float(np.dot(cb, cb))
        d += dd
        n += nn
    return d, n


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def format_text(ins: Inspection, cmp: Comparison | None = None, top: int = 10) -> str:
    """The human report: headline figures, non-finite tensors, layer norms, movers."""
    lines = [
        f"checkpoint   {ins.path} ({ins.format}, {len(ins.files)} file(s), {_size(ins.bytes)})",
        f"parameters   {ins.parameters:,} in {ins.tensors} tensors",
        f"global norm  {ins.global_norm:.6g}",
    ]
    if ins.nonfinite:
        lines.append(f"non-finite   {len(ins.nonfinite)} tensor(s)")
        lines += [f"  {t['name']}  nan={t['nan']} inf={t['inf']}" for t in ins.nonfinite]
    else:
        lines.append("non-finite   none")
    if ins.skipped:
        lines.append(f"not reduced  {len(ins.skipped)} tensor(s) of a dtype numpy lacks")
    lines.append("layer norms")
    width = max((len(k) for k in ins.layers), default=0)
    lines += [f"  {k:<{width}}  {v:.6g}" for k, v in ins.layers.items()]
    if cmp is not None:
        lines.append(f"moved most against {cmp.against} (||a-b|| / ||b||)")
        shown = cmp.changes[:top]
        width = max((len(c.layer) for c in shown), default=0)
        lines += [f"  {c.layer:<{width}}  {c.relative:.4g}" for c in shown]
        for label, names in (
            ("only here", cmp.only_here),
            ("only there", cmp.only_there),
            ("shape differs", cmp.shape_mismatch),
        ):
            if names:
                more = " ..." if len(names) > top else ""
                lines.append(f"{label}: {', '.join(names[:top])}{more}")
    return "\n".join(lines)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{n} B"
        size /= 1024
    return f"{n} B"

