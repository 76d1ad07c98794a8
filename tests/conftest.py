"""Shared fixtures: real files and folders, no mocks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest


def make_checkpoint(
    root: Path, step: int, payload: bytes | None = None, marker: bool = True
) -> Path:
    """A checkpoint folder in HF order: weights first, trainer_state.json last."""
    ck = root / f"checkpoint-{step}"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(
        payload if payload is not None else step.to_bytes(4, "little") * 256
    )
    (ck / "optimizer.pt").write_bytes(os.urandom(64))
    if marker:
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return ck


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    return d
