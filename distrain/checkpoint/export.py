"""Consolidated weights out of a checkpoint: read them in one process (no process group), export to safetensors.

A DCP checkpoint holds each rank's shard; DCP's format utilities rebuild the full tensors from its metadata
without a model or a process group (the path ``dcp_to_torch_save`` takes), here through the safe reader. An
engine (DeepSpeed) checkpoint carries a consolidated ``model.safetensors`` written at save time instead.
The export is a plain ``.safetensors`` file plus a small JSON beside it (model name and kwargs, data spec),
also embedded in the file's own metadata so the file alone is enough to rebuild the model.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Sequence, Tuple

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
import torch

from distrain.checkpoint.discovery import resolve_checkpoint
from distrain.checkpoint.paths import CONSOLIDATED, DCP_DIR
from distrain.checkpoint.safe_load import load_full_state
from distrain.checkpoint.trainer_state import TrainerState
from distrain.errors import CheckpointError, StorageError, UsageError
from distrain.storage_errors import is_storage_error, write_failure_hint
from distrain.compression.int8_format import dequantize_state, quantization_of

EXPORT_FORMAT = "distrain-export/1"
METADATA_KEY = "distrain"
# A step between reading a checkpoint's weights and writing the export: (weights, description) -> the same, changed
# (distrain.compression.quantized_export: sparsity report, int8 quantization).
ExportStep = Callable[[Dict[str, torch.Tensor], Dict[str, Any]], Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]


def export_description(state: TrainerState, source: Path) -> Dict[str, Any]:
    """What the JSON beside an export says: enough to rebuild the model and its data, and where it came from."""
    cfg = state.config
    return {
        "format": EXPORT_FORMAT, "model": state.model, "data_spec": state.data_spec,
        "data": {k: cfg["data"][k] for k in ("name", "kwargs", "eval_fraction")},
        "step": state.step, "config_hash": state.config_hash, "source": str(source), "versions": state.versions,
        "config": cfg,
    }


def read_checkpoint_weights(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Full model weights and their description from a checkpoint, a run directory or an exported file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_export(path)
    ckpt = resolve_checkpoint(path)
    state = TrainerState.read(ckpt)
    return checkpoint_weights(ckpt, state), export_description(state, ckpt)


def checkpoint_weights(ckpt: Path, state: TrainerState) -> Dict[str, torch.Tensor]:
    """Full model weights of a checkpoint directory already validated (``resolve_checkpoint``)."""
    if state.engine_checkpoint:
        weights = load_file(str(ckpt / CONSOLIDATED))
    else:
        weights = load_full_state(ckpt / DCP_DIR, keys={"model"}).get("model", {})
    if not weights:
        raise CheckpointError(f"Checkpoint {ckpt} holds no model weights.")
    return weights


def read_export(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Weights and description of an exported ``.safetensors`` file."""
    meta = read_export_description(path)
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}.") from None
    quantization = quantization_of(meta)
    if quantization:  # an int8 export (`ckpt export --quantize int8`): the float weights it stands for
        weights = dequantize_state(weights, quantization["tensors"])
    return weights, meta


def read_export_description(path: Path) -> Dict[str, Any]:
    """The description of an exported file: from its own metadata, or else the JSON beside it."""
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (or is not a file).")
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file: {err}.") from None
    sidecar = path.with_suffix(".json")
    if text is None and sidecar.is_file():
        text = sidecar.read_text()
    if text is None:
        raise CheckpointError(f"{path} carries no distrain description (its metadata has no {METADATA_KEY!r} "
                              f"entry and there is no {sidecar.name} beside it); export it with `distrain ckpt "
                              f"export`, or load the weights into your own model with load_state_dict.")
    try:
        return json.loads(text)
    except ValueError as err:
        raise CheckpointError(f"The distrain description of {path} is not valid JSON: {err}.") from None


def not_a_checkpoint(path: Path, key: str) -> CheckpointError:
    """What to say when an exported file is given where a checkpoint is needed (e.g. train.resume)."""
    try:
        meta = read_export_description(path)
    except CheckpointError:
        meta = {}
    kind = "an int8 export" if quantization_of(meta) else "an exported weights file" if meta else "a file"
    source = f" Resume from the checkpoint it was exported from: {meta['source']}." if meta.get("source") else ""
    return CheckpointError(f"{key}={str(path)!r} is {kind}, not a checkpoint: an export holds the model weights only "
                           f"(no optimizer state, data position or RNG), so training cannot continue from it. Give a "
                           f"run directory or a checkpoint directory (runs/NAME/checkpoints/step_XXXXXXXX).{source}",
                           key=key)


def export_checkpoint(source: Path, out: Path, steps: Sequence[ExportStep] = ()) -> Tuple[Path, Path]:
    """Write the consolidated weights of ``source`` (checkpoint or run dir) to ``out`` (.safetensors) and the
    description to ``out`` with a .json suffix, after ``steps`` (each may change both); returns both paths."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise CheckpointError(f"--out {str(out)!r} must end in .safetensors (the export format).", key="--out")
    check_writable(out)
    weights, meta = read_checkpoint_weights(Path(source))
    for step in steps:
        weights, meta = step(weights, meta)
    text = json.dumps(meta, indent=1)
    # safetensors refuses tensors that share memory; a clone per tensor makes each its own (tied weights stay
    # tied by name in the model, which load_state_dict restores).
    try:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}, str(out),
                  metadata={METADATA_KEY: text})
    except SafetensorError as err:  # its Rust writer reports I/O failures without an errno

        hint = write_failure_hint(out)
        raise StorageError(f"Writing the export {out} failed: {err}" + (f", because {hint}" if hint else "") + ".") \
            from None
    sidecar = out.with_suffix(".json")
    sidecar.write_text(text + "\n")
    return out, sidecar


def check_writable(out: Path) -> None:
    """Refuse an --out that cannot be written (under a file, a directory itself, no permission) before any work."""
    try:
        if out.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(out))
        existing = next(p for p in (out.parent, *out.parent.parents) if p.exists())
        if not existing.is_dir():  # mkdir would only say "File exists"
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        if is_storage_error(err) and err.errno != errno.EROFS:  # a full disk is a runtime failure (exit 1)
            raise
        raise UsageError(f"--out {str(out)!r} cannot be written: {err.strerror} ('{err.filename or out}'). Choose a "
                         f"writable path ending in .safetensors.", key="--out") from None
