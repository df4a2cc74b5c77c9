"""Evaluate a checkpoint (or an exported file) on its eval split, in one process or under torchrun.

The run's saved config rebuilds the same model and data in a Trainer, the consolidated weights go into it, and
``Trainer.evaluate`` does the work, sharded over however many ranks there are now. The evaluation's own logs go
to ``<run_dir>/eval/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from distrain.checkpoint.discovery import resolve_checkpoint
from distrain.checkpoint.export import checkpoint_weights, read_export, read_export_description
from distrain.checkpoint.trainer_state import TrainerState
from distrain.env import detect
from distrain.compression.int8_format import quantization_of
from distrain.errors import CheckpointError
from distrain.telemetry.units import format_bytes
from distrain.training.trainer import Trainer


def _source(path: Path) -> Tuple[Dict[str, Any], Path, int, Dict[str, Any], str]:
    """(saved config, run dir for the eval logs, step, model description, checkpoint name) of ``path``."""
    if path.suffix == ".safetensors":
        meta = read_export_description(path)
        if "config" not in meta:
            raise CheckpointError(f"{path} carries no config; export it with `distrain ckpt export`.")
        return meta["config"], path.parent, int(meta.get("step", 0)), meta.get("model", {}), str(path)
    ckpt = resolve_checkpoint(path)
    state = TrainerState.read(ckpt)
    return state.config, ckpt.parent.parent, state.step, state.model, str(ckpt)


def evaluate_checkpoint(path: Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Eval-split loss (and accuracy for classifiers) of the model at ``path``; call on every rank.

    Evaluation is forward-only, so it runs data-parallel (ddp under torchrun, one process otherwise) whatever
    strategy trained the model; the precision is the run's. Returns {"step", "checkpoint", "eval_loss",
    ["eval_accuracy"]}.
    """
    path = Path(path)
    config, run_dir, step, model_info, name = _source(path)
    if model_info.get("source") != "config":
        raise CheckpointError(f"{path} holds a model passed to Trainer as an object; evaluate it with your own "
                              f"Trainer(model=..., eval_data=...) and trainer.load_checkpoint(path).")
    info = detect()
    config = dict(config, strategy={"name": "ddp" if info.distributed else "single", "kwargs": {}})
    # The training batch plan plays no part in evaluation, but must split over this world size to build a Trainer.
    forced = [f"train.global_batch={info.world_size}", "train.micro_batch=null",
              f"run.dir={run_dir}", "run.name=eval", "train.resume=never", "checkpoint.every=0",
              "checkpoint.every_minutes=0", "checkpoint.at_end=false", "checkpoint.async_save=false",
              "metrics.progress=none", "train.prune.amount=0", "train.qat=none"]  # the weights as saved
    meta: Dict[str, Any] = {}
    if path.suffix == ".safetensors":
        weights, meta = read_export(path)
    else:  # the checkpoint _source chose, verified (and reported if it fell back): read, not hashed again
        weights = checkpoint_weights(Path(name), TrainerState.read(Path(name)))
    with Trainer(config, overrides=[*forced, *overrides]) as trainer:
        _load_full_weights(trainer, weights)
        if trainer.eval_data is None:
            raise CheckpointError(f"The data of {path} has no eval split (data.eval_fraction is 0), so there is "
                                  f"nothing to evaluate.")
        scores = trainer.evaluate()
        reference = _fp32_reference(trainer, path, meta) if meta else {}
    return {"step": step, "checkpoint": name, **scores, **reference}


def _fp32_reference(trainer: Any, path: Path, meta: Dict[str, Any]) -> Dict[str, Any]:
    """An int8 export's size, and its checkpoint's fp32 scores and export size beside it (when it still exists)."""
    quantization = quantization_of(meta)
    if not quantization:
        return {}
    result: Dict[str, Any] = {"bytes": path.stat().st_size, "fp32_bytes": quantization["fp32_bytes"]}
    source = Path(meta.get("source", ""))
    if not source.is_dir():
        result["fp32_missing"] = f"its checkpoint {source} is gone"
        return result
    _load_full_weights(trainer, checkpoint_weights(source, TrainerState.read(source)))
    result["fp32"] = trainer.evaluate()
    return result


def _load_full_weights(trainer: Any, weights: Dict[str, Any]) -> None:
    """Full weights into the strategy's (wrapped) model."""
    # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(trainer.strategy.model, weights, options=StateDictOptions(full_state_dict=True))


def scores_text(scores: Dict[str, Any]) -> str:
    """"eval_loss 0.0660, eval_accuracy 0.9889": the eval_* entries of a result."""
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.startswith("eval_"))


def int8_summary(result: Dict[str, Any]) -> str:
    """For an int8 export's result: its size and scores beside the fp32 export's size and its checkpoint's scores."""
    fp32 = scores_text(result["fp32"]) if "fp32" in result else f"not evaluated: {result['fp32_missing']}"
    return (f"int8 {format_bytes(result['bytes'])} ({result['bytes'] / result['fp32_bytes']:.2f}x): "
            f"{scores_text(result)}; fp32 {format_bytes(result['fp32_bytes'])}: {fp32}")

