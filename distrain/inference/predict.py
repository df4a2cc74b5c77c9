"""Inference with a trained model: rebuild a built-in model from a checkpoint or an exported file, then classify
or sample text.

    model = distrain.load_model("runs/gpt-text")                 # newest valid checkpoint of a run
    print(distrain.generate_text(model, "def ", tokens=200, temperature=0.8))
    model = distrain.load_model("model.safetensors")             # an export from `distrain ckpt export`
    classes, probs = distrain.classify(model, images)

Everything loads without unpickling code: DCP through the safe reader, exports through safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from distrain.checkpoint.export import read_checkpoint_weights
from distrain.data import build_datasets, fetch_batch, split_input_target
from distrain.data.datasets import VOCAB, DataSpec, decode, encode
from distrain.errors import CheckpointError, UsageError
from distrain.models import build_model

PathLike = Union[str, Path]


@dataclass
class LoadedModel:
    """A rebuilt model (CPU, eval mode) and the description it came with (model, data, spec, step, config)."""

    model: nn.Module
    meta: Dict[str, Any]

    @property
    def spec(self) -> DataSpec:
        return spec_from_dict(self.meta["data_spec"])

    @property
    def step(self) -> int:
        return int(self.meta.get("step", 0))


def spec_from_dict(data: Dict[str, Any]) -> DataSpec:
    return DataSpec(task=data["task"], input_shape=tuple(data.get("input_shape", ())),
                    num_classes=int(data.get("num_classes", 0)), output_dim=int(data.get("output_dim", 0)),
                    extra=dict(data.get("extra", {})))


def load(path: PathLike) -> LoadedModel:
    """The built-in model saved at ``path`` (a run dir, a checkpoint dir or an exported .safetensors file)."""
    weights, meta = read_checkpoint_weights(Path(path))
    model = build_described(meta, path)
    _load_strict(model, weights, path)
    return LoadedModel(model.eval(), meta)


def build_described(meta: Dict[str, Any], path: PathLike) -> nn.Module:
    """A fresh built-in model as a checkpoint's or export's description ``meta`` names it (weights not loaded)."""
    info = meta.get("model", {})
    if info.get("source") != "config":
        raise CheckpointError(
            f"{path} holds a model that was passed to Trainer as an object ({info.get('class', 'unknown class')}), "
            f"so distrain cannot rebuild it by name. Build it yourself and call "
            f"distrain.load_weights(model, {str(path)!r}).")
    if not meta.get("data_spec"):
        raise CheckpointError(f"{path} has no data spec (the model was trained on a dataset without `spec`), so "
                              f"the built-in model's shapes are unknown. Use distrain.load_weights(model, path).")
    return build_model(info["name"], info.get("kwargs") or {}, spec_from_dict(meta["data_spec"]))


def load_model(path: PathLike) -> nn.Module:
    """The built-in model from a checkpoint, a run directory (its newest valid checkpoint) or an export; CPU,
    eval mode."""
    return load(path).model


def load_weights(model: nn.Module, path: PathLike) -> nn.Module:
    """Load the weights saved at ``path`` into your own ``model`` (strict: every name and shape must match)."""
    weights, _ = read_checkpoint_weights(Path(path))
    _load_strict(model, weights, path)
    return model


def _load_strict(model: nn.Module, weights: Dict[str, torch.Tensor], path: PathLike) -> None:
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise CheckpointError(f"The weights in {path} do not fit the model: {detail[:600]}") from None


@torch.no_grad()
def classify(model: nn.Module, inputs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Predicted classes and their probabilities for a batch of inputs."""
    probs = torch.softmax(model(inputs).float(), dim=-1)
    confidence, classes = probs.max(dim=-1)
    return classes, confidence


def unknown_characters(text: str) -> List[str]:
    """The distinct characters of ``text`` that the built-in char-level vocabulary lacks (read as the unknown one)."""
    return sorted(set(text) - set(VOCAB))


@torch.no_grad()
def generate_text(model: nn.Module, prompt: str, tokens: int = 200, temperature: float = 0.8,
                  top_k: Optional[int] = None, seed: int = 0, block_size: Optional[int] = None) -> str:
    """Sample ``tokens`` characters after ``prompt`` from a char-level model (temperature 0: greedy).

    The context is cropped to ``block_size`` (the model's own, for GPT) so a model sees at most the window it
    was trained on. Sampling uses its own seeded generator: the same seed gives the same text.
    """
    if temperature < 0:
        raise UsageError(f"temperature {temperature} is not allowed: use 0 (greedy) or a positive number.")
    if not prompt:
        raise UsageError("the prompt is empty: give at least one character, e.g. --prompt 'def '.")
    window = getattr(model, "block_size", None) or block_size
    generator = torch.Generator().manual_seed(seed)
    ids = encode(prompt).unsqueeze(0)
    for _ in range(tokens):
        context = ids[:, -window:] if window else ids
        logits = model(context)[0, -1].float()
        if temperature == 0:
            next_id = logits.argmax().view(1)
        else:
            logits = logits / temperature
            if top_k:
                cutoff = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < cutoff, float("-inf"))
            next_id = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return decode(ids[0].tolist())


def predict_samples(loaded: LoadedModel, indices: Sequence[int], split: str = "eval") -> List[Dict[str, Any]]:
    """Predictions for samples of the model's own built-in dataset: class (or values) predicted vs true."""
    data = loaded.meta.get("data", {})
    train, evaluation = build_datasets(data["name"], data.get("kwargs") or {}, data.get("eval_fraction", 0.2))
    dataset = evaluation if split == "eval" else train
    if dataset is None:
        raise UsageError(f"the {data['name']} data has no eval split (data.eval_fraction=0); use --split train.")
    bad = [i for i in indices if not 0 <= i < len(dataset)]
    if bad:
        raise UsageError(f"--index {bad[0]} is out of range: the {split} split has {len(dataset)} samples "
                         f"(0..{len(dataset) - 1}).")
    inputs, targets = split_input_target(fetch_batch(dataset, list(indices)))
    if loaded.spec.task == "classification":
        classes, confidence = classify(loaded.model, inputs)
        return [{"index": i, "predicted": int(c), "true": int(t), "probability": float(p)}
                for i, c, t, p in zip(indices, classes, targets, confidence)]
    if loaded.spec.task == "regression":
        with torch.no_grad():
            outputs = loaded.model(inputs)
        return [{"index": i, "predicted": o.tolist(), "true": t.tolist()} for i, o, t in zip(indices, outputs, targets)]
    raise UsageError(f"--index predicts samples of classification or regression data; this model is a "
                     f"{loaded.spec.task} model: use --prompt to sample text.")


__all__ = ["LoadedModel", "load", "load_model", "load_weights", "classify", "generate_text", "predict_samples"]
