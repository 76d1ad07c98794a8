"""Read a checkpoint's tensors one at a time, in bounded memory.

``*.safetensors`` is a little-endian JSON header followed by raw tensor bytes, so each
tensor is a ``numpy.memmap`` view: nothing is read until it is reduced, chunk by chunk,
and the page cache can drop what was read, so a checkpoint larger than RAM works.
The header is parsed here rather than by ``safetensors.safe_open(framework="numpy")``
because numpy has no bfloat16 and ``safe_open`` refuses those tensors, and because the
daemon's checkpoint scan must run without torch or safetensors installed. The tests
check this reader against files written by ``safetensors.torch.save_file``.

A torch ``.bin``/``.pt``/``.ckpt`` is read with ``torch.load(weights_only=True,
mmap=True)`` (no pickle code runs), imported only when such a file is opened; a
Lightning checkpoint's ``state_dict`` is the model.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHUNK",
    "CheckpointError",
    "TensorFile",
    "checkpoint_files",
    "float_chunks",
    "iter_tensors",
]

CHUNK = 1 << 22  # elements reduced at a time: 32 MiB as float64

_ST_DTYPES: Mapping[str, Any] = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
_MAX_HEADER = 100 << 20  # the format's own limit
# Files in an HF checkpoint folder that hold no model weights.
_NOT_WEIGHTS = ("optimizer", "scheduler", "scaler", "rng_state", "training_args")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class CheckpointError(Exception):
    """A checkpoint that cannot be read; the message says what to do."""


@dataclass(frozen=True, slots=True)
class TensorFile:
    """One tensor, not yet read: ``data`` is a flat view (memmap or torch-backed)."""

    name: str
    dtype: str  # the safetensors dtype name: F32, BF16, ...
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]

    @property
    def is_float(self) -> bool:
        """A floating-point tensor numpy can reduce (F8 and other exotic types are not:
        their ``data`` is empty and ``unreadable`` is true)."""
        return self.dtype in _FLOAT_DTYPES

    @property
    def unreadable(self) -> bool:
        return self.data.size != self.numel

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def checkpoint_files(path: Path) -> tuple[str, list[Path]]:
    """The weight files of a snapshot, a checkpoint folder or a single file:
    ``("safetensors", [...])`` when there are any, else ``("torch", [...])``."""
    if not path.exists():
        raise CheckpointError(f"no such file or folder: {path}")
    if path.is_dir() and (path / "metadata.json").is_file() and (path / "model").exists():
        path = path / "model"  # a snapshot made by smart-monitor
    if path.is_file():
        return ("safetensors" if path.suffix == ".safetensors" else "torch"), [path]
    st = sorted(p for p in path.glob("*.safetensors") if p.is_file())
    if st:
        return "safetensors", st
    pt = sorted(
        p for p in path.iterdir()
        if p.suffix in _TORCH_SUFFIXES and p.is_file() and not p.name.startswith(_NOT_WEIGHTS)
    )
    if pt:
        return "torch", pt
    raise CheckpointError(f"no model weights (*.safetensors, *.bin, *.pt, *.ckpt) in {path}")


def iter_tensors(files: list[Path], fmt: str) -> Iterator[TensorFile]:
    """Every tensor of every file, in file then name order."""
    read = _safetensors if fmt == "safetensors" else _torch_file
    for f in files:
        yield from read(f)


def _safetensors(path: Path) -> Iterator[TensorFile]:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: too short for a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header of {n} bytes)")
            header = json.loads(fh.read(n))
            size = os.fstat(fh.fileno()).st_size
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: unreadable safetensors header: {exc}") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: {exc.strerror or exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not an object)")
    header.pop("__metadata__", None)
    base = 8 + n
    for name in sorted(header):
        try:
            info = header[name]
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: bad header entry for tensor {name}") from None
        np_dtype = _ST_DTYPES.get(dtype)
        if np_dtype is None:  # F8 and other types numpy cannot hold: shown, not reduced
            yield TensorFile(name, dtype, shape, np.zeros(0, np.uint8))
            continue
        if base + end > size:
            raise CheckpointError(f"{path}: truncated (tensor {name} ends past the file)")
        count = (end - start) // np.dtype(np_dtype).itemsize
        data = (
            np.memmap(path, dtype=np_dtype, mode="r", offset=base + start, shape=(count,))
            if count
            else np.zeros(0, np_dtype)
        )
        yield TensorFile(name, dtype, shape, data)


def _torch_file(path: Path) -> Iterator[TensorFile]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{path} is a torch file: install smart-monitor[torch] to read it"
        ) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a legacy (non-zip) file cannot be memory-mapped: try it whole
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"{path}: cannot load with weights_only=True: {exc}") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]  # a Lightning checkpoint
    tensors = dict(_flatten(obj, "", torch.Tensor))
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors")
    for name in sorted(tensors):
        t = tensors[name].detach()
        dtype = _TORCH_NAMES.get(str(t.dtype).removeprefix("torch."), "other")
        if t.dtype == torch.bfloat16:
            flat = t.reshape(-1).view(torch.int16).numpy().view(np.uint16)
        elif dtype == "other":
            flat = np.zeros(0, np.uint8)
        else:
            flat = t.reshape(-1).numpy()
        yield TensorFile(name, dtype, tuple(t.shape), flat)


_TORCH_NAMES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}


def _flatten(obj: Any, prefix: str, tensor_type: type) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, tensor_type):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k), tensor_type)


def float_chunks(t: TensorFile) -> Iterator[np.ndarray[Any, np.dtype[np.float64]]]:
    """The tensor as float64 chunks of at most ``CHUNK`` elements (bf16 widened).

    Each chunk is a view of one buffer reused for the next: fresh multi-MiB arrays per
    chunk would cost a page fault per page, which is most of the time on a big file.
    """
    n = t.data.shape[0]
    if n == 0:
        return
    size = min(CHUNK, n)
    out = np.empty(size, np.float64)
    wide = np.empty(size, np.uint32) if t.dtype == "BF16" else None
    for i in range(0, n, size):
        src = t.data[i : i + size]
        o = out[: src.shape[0]]
        if wide is not None:  # bfloat16 is the top half of a float32
            w = wide[: src.shape[0]]
            np.left_shift(src, 16, out=w, dtype=np.uint32)
            np.copyto(o, w.view(np.float32))
        else:
            np.copyto(o, src)
        yield o
