"""``train.compile``: ``torch.compile`` per block, in place, for the training steps.

Where it goes (the placement torchtitan and Accelerate use, and why):

* **Per block, not the whole model.** A transformer's blocks share one class and one structure, so Dynamo
  compiles one block and reuses that graph for all of them (guards on the structure, not the instance): compile
  time stays that of one block however deep the model is. A model without blocks (``train.blocks``, see
  distrain.models.blocks) is compiled whole.
* **In place** (``module._compiled_call_impl``, what ``nn.Module.compile()`` sets), never ``torch.compile(module)``:
  no ``OptimizedModule`` wrapper, so parameter names, state dicts, checkpoints and exports stay plain (no
  ``_orig_mod.``), and hooks that wrappers add later still run, because they live in ``_call_impl``.
* **After activation checkpointing** (the checkpoint becomes one traced region) **and before FSDP2 and DDP**:
  ``fully_shard`` and DDP then wrap compiled blocks, and their collectives stay outside the compiled graphs
  (FSDP2's hooks run eagerly between them; DDP's reducer fires on the gradients the compiled backward produces).
  DeepSpeed compiles after ``deepspeed.initialize``, on ``engine.module``, as Accelerate does.

Only training steps run compiled: a call in eval mode or under ``torch.no_grad()`` (evaluation, inference) runs
the plain module. Evaluation batches come in other sizes (the eval batch, the last partial batch, padding), each
of which would cost a recompile, and evaluation is a small share of a run; so no eval shape ever recompiles.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from distrain.models.blocks import find_blocks


def compile_options(options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``train.compile_options`` (checked against COMPILE_OPTIONS when the config loads) as plain keyword arguments."""
    plain = dict(options or {})
    if isinstance(plain.get("options"), Mapping):
        plain["options"] = dict(plain["options"])
    return plain


def apply_compile(model: nn.Module, options: Optional[Mapping[str, Any]], blocks: Optional[Sequence[str]]
                  ) -> List[nn.Module]:
    """Compile ``model``'s blocks (or the whole model when it has none) in place; returns what was compiled."""
    kwargs = compile_options(options)
    targets = find_blocks(model, blocks, key="train.blocks") or [model]
    for module in targets:
        _compile_for_training(module, kwargs)
    return targets


def _compile_for_training(module: nn.Module, kwargs: Dict[str, Any]) -> None:
    compiled = torch.compile(module._call_impl, **kwargs)
    plain = module._call_impl

    def call(*args: Any, **kw: Any) -> Any:
        if module.training and torch.is_grad_enabled():
            return compiled(*args, **kw)
        return plain(*args, **kw)

    module._compiled_call_impl = call
