"""Evaluate a checkpoint (or an exported file) on its eval split, in one process or under torchrun.

The run's saved config rebuilds the same Trainer (model, data, strategy); ``Trainer.evaluate`` does the work,
sharded over however many ranks there are now. The evaluation's own logs go to ``<run_dir>/eval/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Sequence, Tuple

from distrain.checkpoint.discovery import resolve_checkpoint
from distrain.checkpoint.export import read_export, read_export_description
from distrain.checkpoint.trainer_state import TrainerState
from distrain.errors import CheckpointError


def _source(path: Path) -> Tuple[Dict[str, Any], str, Path, int, Dict[str, Any]]:
    """(saved config, train.resume value, run dir for the eval logs, step, model description)."""
    if path.suffix == ".safetensors":
        meta = read_export_description(path)
        if "config" not in meta:
            raise CheckpointError(f"{path} carries no config; export it with `distrain ckpt export`.")
        return meta["config"], "never", path.parent, int(meta.get("step", 0)), meta.get("model", {})
    ckpt = resolve_checkpoint(path)
    state = TrainerState.read(ckpt)
    return state.config, str(ckpt), ckpt.parent.parent, state.step, state.model


def evaluate_checkpoint(path: Path, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Eval-split loss (and accuracy for classifiers) of the model at ``path``; call on every rank.

    Returns {"step", "checkpoint", "eval_loss", ["eval_accuracy"]}.
    """
    from distrain.trainer import Trainer

    path = Path(path)
    config, resume, run_dir, step, model_info = _source(path)
    if model_info.get("source") != "config":
        raise CheckpointError(f"{path} holds a model passed to Trainer as an object; evaluate it with your own "
                              f"Trainer(model=..., eval_data=...) and trainer.load_checkpoint(path).")
    forced = [f"run.dir={run_dir}", "run.name=eval", f"train.resume={resume}", "checkpoint.every=0",
              "checkpoint.every_minutes=0", "checkpoint.at_end=false", "checkpoint.async_save=false",
              "metrics.progress=none"]
    with Trainer(config, overrides=[*forced, *overrides]) as trainer:
        if resume == "never":
            _load_export(trainer, path)
        if trainer.eval_data is None:
            raise CheckpointError(f"The data of {path} has no eval split (data.eval_fraction is 0), so there is "
                                  f"nothing to evaluate.")
        scores = trainer.evaluate()
    return {"step": step, "checkpoint": str(resume if resume != "never" else path), **scores}


def _load_export(trainer: Any, path: Path) -> None:
    """Full weights from an export into the strategy's (possibly wrapped or sharded) model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    weights, _ = read_export(path)
    set_model_state_dict(trainer.strategy.model, weights, options=StateDictOptions(full_state_dict=True))
