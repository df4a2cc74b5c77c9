"""Checkpoints: sharded DCP saves committed atomically, exact resume at any world size, retention, export.

See docs/checkpoints.md. The Trainer owns one ``Checkpointer``; the CLI (`distrain ckpt`, `eval`, `predict`)
and ``distrain.inference`` read checkpoints through ``resolve_checkpoint`` and ``load_model_weights``.
"""

from distrain.checkpoint.checkpointer import Checkpointer
from distrain.checkpoint.discovery import list_checkpoints, newest_valid, resolve_checkpoint
from distrain.checkpoint.trainer_state import TrainerState

__all__ = ["Checkpointer", "TrainerState", "list_checkpoints", "newest_valid", "resolve_checkpoint"]
