"""Checkpoint forensics: what is inside a snapshot's weights (``smart-monitor inspect``)
and the daemon's optional scan of each new checkpoint. Needs numpy only for
safetensors files; torch files need the ``smart-monitor[torch]`` extra."""

from smart_monitor.forensics.inspection import (
    Comparison,
    Inspection,
    compare_checkpoints,
    format_text,
    inspect_checkpoint,
)
from smart_monitor.forensics.tensors import CheckpointError

__all__ = [
    "CheckpointError",
    "Comparison",
    "Inspection",
    "compare_checkpoints",
    "format_text",
    "inspect_checkpoint",
]
