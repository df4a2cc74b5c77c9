"""What a checkpoint records besides model and optimizer: the trainer's own state, as JSON (never pickle).

The LR schedule is a pure function of the step (distrain.optim.lr_at) and the data position a pure function
of the global step (GlobalStepSampler), so the step alone restores both; epoch and offset are recorded for
humans and `distrain ckpt inspect`. RNG states are per rank, in rng/rank<r>.json.
"""

from __future__ import annotations

import base64
import json
import os
import random
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from omegaconf import DictConfig
from torch import nn

from distrain.checkpoint.paths import RNG_DIR, TRAINER_STATE
from distrain.config import to_container
from distrain.errors import CheckpointError


@dataclass
class TrainerState:
    step: int  # optimizer steps completed; training continues at this step
    data_epoch: int  # where step ``step`` starts in the sample stream (informational: it follows from step)
    data_offset: int
    world_size: int  # ranks that wrote the checkpoint
    strategy: str
    engine_checkpoint: bool  # True: engine/ holds the engine's own format (DeepSpeed) instead of dcp/
    config: Dict[str, Any]  # the resolved config of the run that saved
    config_hash: str
    model: Dict[str, Any]  # {"source": "config", "name", "kwargs"} or {"source": "object", "class"}
    data_spec: Optional[Dict[str, Any]]  # the built-in DataSpec (task, shapes, classes), to rebuild the model
    versions: Dict[str, str]
    reason: str = "manual"  # every | every_minutes | end | manual | preempt ...
    created: float = field(default_factory=time.time)
    run_id: Optional[str] = None  # the lineage of checkpoints this belongs to (None: written before lineages)
    # {"train", "eval"} fingerprints of the data (distrain.data.fingerprint); None: written before fingerprints
    data_fingerprint: Optional[Dict[str, Any]] = None
    # The micro-batch the run trained at when it saved (train.micro_batch=auto resumes there at the same world
    # size); None: written before it was kept
    micro_batch: Optional[int] = None
    # Whether the strategy was exact with its kwargs and its DCP state portable (distrain.checkpoint.conversion: a
    # resume may then change the strategy); None: written before they were recorded
    strategy_exact: Optional[bool] = None
    portable_checkpoint: Optional[bool] = None
    # The fp16 grad scaler is strategy state: Strategy.checkpoint_state puts it beside model and optimizer in DCP.

    def write(self, directory: Path) -> None:
        _write_json(directory / TRAINER_STATE, asdict(self))

    @classmethod
    def read(cls, directory: Path) -> "TrainerState":
        path = Path(directory) / TRAINER_STATE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} is missing: {directory} is not a distrain checkpoint.") from None
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path} cannot be read as JSON: {err}.") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} is not a distrain trainer state (a JSON object was expected).")
        names = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is MISSING
                         and f.default_factory is MISSING)
        if missing:
            raise CheckpointError(f"{path} is not a distrain trainer state (missing {', '.join(missing)}).")
        return cls(**{k: v for k, v in data.items() if k in names})


def model_description(cfg: DictConfig, model_object: Optional[nn.Module]) -> Dict[str, Any]:
    """How to rebuild the model from a checkpoint: a registry name and kwargs, or (user object) its class."""
    if model_object is None:
        return {"source": "config", "name": cfg.model.name, "kwargs": to_container(cfg.model)["kwargs"]}
    cls = type(model_object)
    return {"source": "object", "class": f"{cls.__module__}.{cls.__qualname__}"}


def spec_dict(spec: Any) -> Optional[Dict[str, Any]]:
    """A built-in DataSpec as JSON (``TrainerState.data_spec``); None for a user's data set."""
    if spec is None or not hasattr(spec, "__dataclass_fields__"):
        return None
    data = asdict(spec)
    data["input_shape"] = list(data.get("input_shape", ()))
    return data


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


# --- RNG states ---------------------------------------------------------------------------------------------
def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _b64_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def capture_rng() -> Dict[str, Any]:
    """This process's torch, CUDA, numpy and Python RNG states, as JSON-safe data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: Dict[str, Any] = {
        "torch": _tensor_b64(torch.get_rng_state()),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_tensor_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: Dict[str, Any]) -> None:
    """Put back what ``capture_rng`` recorded."""
    torch.set_rng_state(_b64_tensor(state["torch"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda: List[torch.Tensor] = [_b64_tensor(s) for s in state["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def write_rng(directory: Path, rank: int) -> None:
    _write_json(directory / RNG_DIR / f"rank{rank}.json", capture_rng())


def read_rng(directory: Path, rank: int) -> Optional[Dict[str, Any]]:
    path = directory / RNG_DIR / f"rank{rank}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise CheckpointError(f"{path} cannot be read as JSON: {err}.") from None
