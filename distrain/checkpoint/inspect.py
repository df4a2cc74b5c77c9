"""What is inside a checkpoint, without loading any tensor data: names, shapes and dtypes from DCP's metadata
(read through the safe unpickler) or the safetensors header, and the trainer state."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from distrain.checkpoint.discovery import resolve_checkpoint
from distrain.checkpoint.export import read_export_description
from distrain.checkpoint.paths import CONSOLIDATED, DCP_DIR
from distrain.checkpoint.manifest import read_manifest
from distrain.checkpoint.safe_load import read_metadata
from distrain.checkpoint.trainer_state import TrainerState


def describe(path: Path) -> Dict[str, Any]:
    """{"path", "summary": {...}, "tensors": [{"name", "shape", "dtype"}], "values": [non-tensor entries]}."""
    if path.suffix == ".safetensors":
        return _describe_export(path)
    ckpt = resolve_checkpoint(path)
    state = TrainerState.read(ckpt)
    manifest = read_manifest(ckpt) or {}
    summary = {
        "step": state.step, "data position": f"epoch {state.data_epoch}, offset {state.data_offset}",
        "world size": state.world_size, "strategy": state.strategy, "reason": state.reason,
        "model": state.model, "config hash": state.config_hash, "versions": state.versions,
        "files": len(manifest.get("files", {})), "bytes": manifest.get("total_bytes"),
    }
    tensors: List[Dict[str, Any]] = []
    values: List[str] = []
    if state.engine_checkpoint:
        tensors = _safetensors_header(ckpt / CONSOLIDATED, prefix="model.")
        summary["format"] = f"engine checkpoint ({state.strategy}) + consolidated {CONSOLIDATED}"
    else:
        for name, item in read_metadata(ckpt / DCP_DIR).state_dict_metadata.items():
            if hasattr(item, "size"):
                tensors.append({"name": name, "shape": list(item.size),
                                "dtype": str(item.properties.dtype).replace("torch.", "")})
            else:
                values.append(name)
        summary["format"] = "torch.distributed.checkpoint (DCP)"
    return {"path": str(ckpt), "summary": summary, "tensors": tensors, "values": values,
            "trainer_state": vars(state)}


def _safetensors_header(path: Path, prefix: str = "") -> List[Dict[str, Any]]:
    from safetensors import safe_open  # lazy: start-up: safetensors.torch pulls in torch

    with safe_open(str(path), framework="pt") as f:
        out = []
        for key in f.keys():
            sl = f.get_slice(key)
            out.append({"name": prefix + key, "shape": list(sl.get_shape()), "dtype": _dtype_name(sl.get_dtype())})
        return out


def _dtype_name(code: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
            "I32": "int32", "U8": "uint8", "BOOL": "bool"}.get(code, code)


def _describe_export(path: Path) -> Dict[str, Any]:
    meta = read_export_description(path)
    summary = {k: meta.get(k) for k in ("format", "step", "model", "data", "config_hash", "source", "versions")}
    return {"path": str(path), "summary": summary, "tensors": _safetensors_header(path), "values": [],
            "trainer_state": None}
