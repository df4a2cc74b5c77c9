"""The objective of a step: the sum of per-item losses over the whole global batch / its number of valid items.

An *item* is what a loss averages over: a sample (classification, regression) or a token whose label is not
-100 (language models, padding). Before a step's first backward, its micro-batches are counted, the count is
summed over ranks once (N), and each micro-batch contributes ``its summed item losses / N``. The strategies sum
gradients over micro-batches and ranks, so the synchronised gradient is exactly the gradient of the global-batch
mean, whatever micro_batch, grad_accum and world size. (A mean of per-micro-batch means weights short sequences
up and changes with micro_batch: the gradient-accumulation bug transformers' Trainer and torchtitan fixed the same
way, with ``num_items_in_batch`` and a global valid-token count.)

A micro-batch becomes a loss in one of three ways:

* ``loss_fn(outputs, target)``: outputs = ``model(input)`` for ``(input, target)`` batches; for Mapping batches
  (Hugging Face style) outputs = ``model(**batch)`` without ``labels``, and target = ``batch["labels"]``;
* no loss_fn and Mapping batches: ``model(**batch)`` and the model's own ``loss`` (transformers' convention);
* ``step_fn(model, batch, **frozen)``: any computation, with frozen modules (a teacher) at hand.

How a loss reduces is read from its signature, as transformers does: a loss (or HF forward, or step_fn) that
accepts ``num_items_in_batch`` gets N and returns its summed item losses / N; any other returns the mean over its
own micro-batch's items, which is weighted by ``items / N``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from distrain import dist
from distrain.data import split_input_target
from distrain.data.datasets import IGNORE_INDEX
from distrain.errors import ConfigError, DataError
from distrain.telemetry.logs import get_logger
from distrain.training.empty_items import EmptyItemsCheck

ITEM_RULES = ("samples", "labels", "elements")
NUM_ITEMS = "num_items_in_batch"  # transformers' name for the global item count a summing loss divides by

Count = Union[int, torch.Tensor]
ItemsRule = Union[str, Callable[[Any], Count]]
MetricFn = Callable[[Any, Any], Tuple[Any, Any]]


@dataclass
class MicroLoss:
    """One micro-batch through the objective: ``loss * scale`` is its share of the step's objective."""

    outputs: Any  # what produced the loss (model outputs, or step_fn's return); None when that was the bare loss
    loss: torch.Tensor  # the scalar the loss code returned
    scale: Union[float, torch.Tensor]  # 1 for a summing loss (already / N), items / N for a mean

    @property
    def share(self) -> torch.Tensor:
        """This micro-batch's share of the objective, detached (for logging)."""
        loss = self.loss.detach()
        return loss if isinstance(self.scale, float) and self.scale == 1.0 else loss * self.scale


class FrozenModule:
    """A module a step uses but never trains (a teacher): on this rank's device, in eval mode, run under no_grad.

    Deliberately not an ``nn.Module`` attribute of anything the strategy sees: it is not wrapped by DDP/FSDP, its
    parameters are in no optimizer, and it is in no checkpoint or export. Attributes other than calls are the
    module's own (``teacher.config``); ``.module`` is the module itself.
    """

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.module.training:  # someone called .train() on it: a teacher with dropout on is another teacher
            self.module.eval()
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        module = self.__dict__.get("module")
        if module is None:  # not yet set (copy, unpickling): no delegation
            raise AttributeError(name)
        return getattr(module, name)


def accepts(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (by name; ``**kwargs`` does not count)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    param = params.get(name)
    return param is not None and param.kind in (param.POSITIONAL_OR_KEYWORD, param.KEYWORD_ONLY)


def _takes_var_kwargs(fn: Callable) -> bool:
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False


def forward_parameters(module: nn.Module) -> Optional[frozenset]:
    """The named parameters of ``module.forward``, which a Mapping batch is filtered to (as Composer does); None
    (no filter) when unknown or when the forward takes only ``**kwargs``."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    named = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return named if named or not any(p.kind == p.VAR_KEYWORD for p in params) else None


def forward_sample(module: nn.Module, batch: Any) -> Any:
    """What a batch hands to the model: the input of a pair, or a Mapping filtered to the forward's arguments."""
    pair = _pair(batch)
    if pair is not None:
        return pair[0]
    params = forward_parameters(module)
    return {k: v for k, v in batch.items() if params is None or k in params}


def model_accepts_num_items(module: nn.Module) -> bool:
    """transformers' rule: a model's own ``accepts_loss_kwargs`` when it declares one, else whether its forward
    names ``num_items_in_batch`` or takes ``**kwargs`` (which a transformers model hands to its loss)."""
    declared = getattr(module, "accepts_loss_kwargs", None)
    if declared is not None:
        return bool(declared)
    return accepts(module.forward, NUM_ITEMS) or _takes_var_kwargs(module.forward)


def shifts_labels(module: nn.Module) -> bool:
    """Whether the model's own loss predicts ``labels[..., 1:]`` from the positions before (a transformers causal
    LM), so the first label of every row is never an item."""
    if not type(module).__module__.startswith("transformers"):
        return False
    if getattr(getattr(module, "config", None), "is_encoder_decoder", False):
        return False  # their decoder inputs are shifted instead: every label is an item
    try:
        # lazy: optional: transformers is optional (distrain[hf])
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    return getattr(type(module), "loss_function", None) is not None and module.loss_function is ForCausalLMLoss


def loss_of(outputs: Any) -> Optional[torch.Tensor]:
    """The loss in a model's outputs: the tensor itself, ``outputs["loss"]`` or ``outputs.loss``."""
    if torch.is_tensor(outputs):
        return outputs
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    return getattr(outputs, "loss", None)


def logits_of(outputs: Any) -> Optional[torch.Tensor]:
    """Class logits in a model's outputs: the tensor itself, ``outputs["logits"]`` or ``outputs.logits``."""
    if outputs is None or torch.is_tensor(outputs):
        return outputs
    found = outputs.get("logits") if isinstance(outputs, Mapping) else getattr(outputs, "logits", None)
    return found if torch.is_tensor(found) else None


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)} ({value.dtype})"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
    return f"a {type(value).__name__}"


def _pair(batch: Any) -> Optional[tuple]:
    """(input, target) of a pair-style batch, None for a Mapping that is a model's keyword arguments."""
    try:
        return split_input_target(batch)
    except TypeError:
        if isinstance(batch, Mapping):
            return None
        raise DataError("each batch must be an (input, target) pair, or a Mapping of a model's keyword arguments "
                        f"(Hugging Face style: input_ids, attention_mask, labels, ...); got {_describe(batch)} (the "
                        f"collated samples, or what data.collate_fn returned when it is set)") from None


def batch_size(batch: Any) -> int:
    """Samples in a collated micro-batch: the first dimension of its target (or of its first tensor)."""
    pair = _pair(batch)
    if pair is not None:
        return len(pair[1])
    for value in batch.values():
        if torch.is_tensor(value) and value.dim() > 0:
            return int(value.shape[0])
    raise ConfigError(f"Cannot tell how many samples a batch holds: it is {_describe(batch)} without a tensor.",
                      key="train_data")


class Objective:
    """Turns a step's micro-batches into their shares of the global-batch mean (see the module docstring)."""

    def __init__(self, module: nn.Module, device: torch.device, global_batch: int, *,
                 loss_fn: Optional[Callable] = None, step_fn: Optional[Callable] = None,
                 frozen: Optional[Mapping] = None, items: Optional[ItemsRule] = None,
                 metrics: Optional[Mapping] = None, default_items: Optional[str] = None,
                 sample: Optional[Callable[[], Any]] = None):
        if loss_fn is not None and step_fn is not None:
            raise ConfigError("Pass either loss_fn=... (computed on the model's outputs) or step_fn=... (computes the "
                              "loss from the model and the batch itself), not both.", key="step_fn")
        self.device = device
        self.global_batch = global_batch
        self.loss_fn, self.step_fn = loss_fn, step_fn
        self.metrics: Dict[str, MetricFn] = self._check_metrics(metrics or {})
        self.frozen = freeze(frozen or {}, device, module, step_fn)
        self._forward_params = forward_parameters(module)
        self._dropped_logged: set = set()
        self.shift = shifts_labels(module)
        if step_fn is not None:
            self.source, self.sums = "step_fn", accepts(step_fn, NUM_ITEMS)
        elif loss_fn is not None:
            self.source, self.sums = "loss_fn", accepts(loss_fn, NUM_ITEMS)
        else:
            self.source, self.sums = "the model's forward", model_accepts_num_items(module)
        self.items = self._items_rule(items, default_items, sample)
        self._empty = EmptyItemsCheck(self._empty_message, key="loss_fn" if loss_fn is not None else "step_fn"
                                      if step_fn is not None else "model")
        self.settle_items = self._empty.settle  # collective: at the DivergenceGuard's settle points

    # --- setup checks --------------------------------------------------------------------------------
    @staticmethod
    def _check_metrics(metrics: Mapping) -> Dict[str, MetricFn]:
        for name, fn in metrics.items():
            if not callable(fn):
                raise ConfigError(f"metrics[{name!r}] is {_describe(fn)}; a metric is a function (outputs, batch) -> "
                                  f"(sum, count) whose sums are added over the eval set and divided.", key="metrics")
        return dict(metrics)

    def _items_rule(self, items: Optional[ItemsRule], default: Optional[str],
                    sample: Optional[Callable[[], Any]]) -> ItemsRule:
        """The declared rule, else the built-in task's, else by the data: a Mapping (transformers' convention) or
        integer targets count labels that are not -100, anything else counts samples."""
        if items is not None:
            if callable(items) or items in ITEM_RULES:
                return items
            raise ConfigError(f"items={items!r} is not a way to count a loss's items. Allowed: 'samples' (every "
                              f"sample counts once), 'labels' (every label that is not {IGNORE_INDEX}), 'elements' "
                              f"(every element of fixed-size targets), or a function batch -> count.", key="items")
        if default is not None:
            return default
        if sample is None:
            return "samples"
        pair = _pair(sample())
        if pair is None:  # a Mapping: transformers' convention, labels that are not -100
            return "labels"
        target = pair[1]
        return "labels" if torch.is_tensor(target) and not target.is_floating_point() else "samples"

    @property
    def static_count(self) -> bool:
        """Whether a step's item count is known without a collective: every sample counts once (N = global
        batch), or every element of fixed-size targets (N = global batch x elements per sample)."""
        return self.items in ("samples", "elements")

    # --- counting --------------------------------------------------------------------------------------
    def count(self, batch: Any) -> Count:
        """Items in one micro-batch: a Python int where the count is static (samples, elements), else a 0-dim
        int64 tensor on the device (no host sync)."""
        if self.items == "samples":
            return batch_size(batch)
        if callable(self.items):
            counted = self.items(batch)
            return torch.as_tensor(counted, dtype=torch.int64, device=self.device).reshape(())
        labels, _ = self._labels(batch, for_counting=True)
        if self.items == "elements":
            return labels.numel()
        return (labels != IGNORE_INDEX).sum().to(torch.int64)

    def _labels(self, batch: Any, for_counting: bool = False) -> Tuple[Optional[torch.Tensor], bool]:
        """The targets of a batch as the loss sees them, or None; and whether they were shifted by one position
        (a causal LM's ``labels[..., 1:]``, predicted by positions ``0..T-2``)."""
        pair = _pair(batch)
        if pair is not None:
            return (pair[1] if torch.is_tensor(pair[1]) else None), False
        if "shift_labels" in batch:  # transformers' padding-free collators hand the aligned labels themselves
            return batch["shift_labels"], False
        if "labels" not in batch:
            if not for_counting:
                return None, False
            raise ConfigError(f"A batch has keys {sorted(map(str, batch))} but no 'labels': distrain counts each "
                              f"step's valid items (labels that are not {IGNORE_INDEX}) over all micro-batches and "
                              f"ranks to normalise the loss exactly. Add 'labels' to your samples, or tell distrain "
                              f"how to count: Trainer(..., items='samples') for a per-sample loss, or items=a "
                              f"function batch -> count.", key="items")
        labels = batch["labels"]
        return (labels[..., 1:], True) if self.shift else (labels, False)

    def step_counts(self, batches: Sequence[Any], step: int = 0) -> Tuple[List[Count], Count]:
        """Every micro-batch's item count and the step's global count N (summed over ranks: one all-reduce). Under
        a per-micro-batch mean, a micro-batch without items is noted on the device for ``settle_items`` (no host
        read here: a GPU step makes no host-device sync)."""
        counts = [self.count(b) for b in batches]
        if not (self.sums or self.static_count):
            self._empty.note(counts, step)
        if self.items == "samples":
            return counts, self.global_batch
        if self.items == "elements":  # fixed-size targets: every sample holds as many as the first
            return counts, self.global_batch * (counts[0] // batch_size(batches[0]))
        total = torch.stack(counts).sum()
        return counts, dist.all_reduce_sum(total)

    # --- the loss of one micro-batch ------------------------------------------------------------------
    def micro_loss(self, model: nn.Module, batch: Any, items: Count, total: Count) -> MicroLoss:
        """Forward one micro-batch; ``items`` are its own, ``total`` the step's global count N."""
        outputs, loss = self._forward(model, batch, total)
        if self.sums:
            return MicroLoss(outputs, loss, 1.0)
        if isinstance(items, int) and isinstance(total, int):
            return MicroLoss(outputs, loss, items / total)  # one rounding in double: micro/global, as ever
        return MicroLoss(outputs, loss, torch.as_tensor(items, dtype=torch.float64)
                         / torch.as_tensor(total, dtype=torch.float64))

    def _empty_message(self, micro: int, step: int, rank: int) -> str:
        """The paragraph for a micro-batch without items under a per-micro-batch mean (distrain.training.empty_items)."""
        return (f"Micro-batch {micro} of step {step} on rank {rank} has no valid items (every label is {IGNORE_INDEX}), "
                f"and the loss is a per-micro-batch mean, which is 0/0 there. Let the loss sum instead: {self.source} "
                f"accepting a num_items_in_batch argument and returning the summed item losses / num_items_in_batch "
                f"(distrain passes the step's global count).")

    def _forward(self, model: nn.Module, batch: Any, total: Count) -> Tuple[Any, torch.Tensor]:
        extra = {NUM_ITEMS: total} if self.sums else {}
        if self.step_fn is not None:
            returned = self.step_fn(model, batch, **self.frozen, **extra)
            loss = self._scalar(loss_of(returned), returned, "step_fn")
            return (None if torch.is_tensor(returned) else returned), loss
        pair = _pair(batch)
        if pair is not None:
            inputs, target = pair
            outputs = model(inputs)
        else:
            target = batch.get("labels") if self.loss_fn is not None else None
            kwargs = self.model_kwargs(batch, with_labels=self.loss_fn is None)
            outputs = model(**kwargs, **({} if self.loss_fn is not None else extra))
        if self.loss_fn is not None:
            loss = self.loss_fn(outputs, target, **extra)
            return outputs, self._scalar(loss, loss, "loss_fn")
        own = loss_of(outputs)
        if torch.is_tensor(outputs) and outputs.numel() != 1:
            own = None  # a bare tensor that is not a scalar is the model's prediction, not a loss
        return outputs, self._scalar(own, outputs, "model")

    def model_kwargs(self, batch: Mapping, with_labels: bool = True) -> Dict[str, Any]:
        """A Mapping batch filtered to the model's forward arguments (as Composer does), labels optional."""
        kwargs = {k: v for k, v in batch.items() if with_labels or k not in ("labels", "shift_labels")}
        if self._forward_params is None:
            return kwargs
        dropped = sorted(k for k in kwargs if k not in self._forward_params)
        if dropped and tuple(dropped) not in self._dropped_logged:
            self._dropped_logged.add(tuple(dropped))
            get_logger().info(f"batch keys {dropped} are not arguments of the model's forward; not passed to it")
        return {k: v for k, v in kwargs.items() if k in self._forward_params}

    def _scalar(self, loss: Any, returned: Any, source: str) -> torch.Tensor:
        if loss is None:
            if source == "model":
                raise ConfigError(f"The model returned {_describe(returned)} and no loss, and no loss_fn was given. "
                                  f"A Hugging Face-style model computes its loss when the batch holds its 'labels'; "
                                  f"otherwise pass loss_fn=... (outputs, target) -> loss, or step_fn=... .",
                                  key="loss_fn")
            raise ConfigError(f"{source} returned {_describe(returned)}; it must return the loss: a scalar tensor, "
                              f"or a Mapping/object with a 'loss' entry.", key=source)
        if not torch.is_tensor(loss) or loss.numel() != 1 or not loss.is_floating_point():
            raise ConfigError(f"The loss from {source} is {_describe(loss)}, not a scalar. distrain needs one number "
                              f"per micro-batch: the mean over its items (e.g. reduction='mean'), or, when the "
                              f"function accepts num_items_in_batch, the summed item losses / num_items_in_batch. "
                              f"A loss with reduction='none' must be summed or averaged first.", key=source)
        return loss.reshape(())

    # --- evaluation ----------------------------------------------------------------------------------
    def eval_sums(self, model: nn.Module, batch: Any) -> Dict[str, float]:
        """Sums over one eval batch: loss x items and items (the same forward and normalisation as training, with
        the batch's own count as N), correct and predicted labels when the outputs are logits, and every metric's
        (sum, count)."""
        items = self.count(batch)
        n = int(items)
        at_least_one = max(items, 1) if isinstance(items, int) else items.clamp(min=1)
        outputs, loss = self._forward(model, batch, at_least_one)
        sums: Dict[str, float] = {"loss": float(loss) * n if n else 0.0, "items": float(n)}
        labels, shifted = self._labels(batch)
        hits = correct_and_count(logits_of(outputs), labels, shifted)
        if hits is not None:
            sums["correct"], sums["predicted"] = float(hits[0]), float(hits[1])
        for name, fn in self.metrics.items():
            total, count = fn(outputs, batch)
            sums[f"metric:{name}"], sums[f"count:{name}"] = float(total), float(count)
        return sums


def correct_and_count(logits: Optional[torch.Tensor], targets: Optional[torch.Tensor], shift: bool = False
                      ) -> Optional[Tuple[int, int]]:
    """(correct predictions, predictions) when ``logits`` are class logits for integer ``targets`` (labels that are
    -100 are not predictions), else None. ``shift``: a causal LM, whose position t predicts label t+1."""
    if logits is None or targets is None or not torch.is_tensor(logits) or targets.is_floating_point():
        return None
    if shift:  # predictions of positions 0..T-2 against labels 1..T-1 (the labels passed in are already shifted)
        logits = logits[..., :-1, :]
    if logits.dim() != targets.dim() + 1 or logits.shape[:-1] != targets.shape:
        return None
    valid = targets != IGNORE_INDEX
    correct = (logits.argmax(dim=-1) == targets) & valid
    return int(correct.sum()), int(valid.sum())


def freeze(modules: Mapping, device: torch.device, trained: nn.Module, step_fn: Optional[Callable]
           ) -> Dict[str, FrozenModule]:
    """Frozen modules on ``device`` in eval mode without gradients, after checking they can be handed to step_fn."""
    if modules and step_fn is None:
        raise ConfigError(f"frozen={{{', '.join(map(repr, modules))}}} is given but no step_fn: frozen modules are "
                          f"handed to step_fn(model, batch, **frozen), the only code that can use them.",
                          key="frozen")
    trained_params = {id(p) for p in trained.parameters()}
    out: Dict[str, FrozenModule] = {}
    for name, module in modules.items():
        if not isinstance(module, nn.Module):
            raise ConfigError(f"frozen[{name!r}] is {_describe(module)}; frozen modules must be nn.Modules.",
                              key="frozen")
        if not name.isidentifier() or name in ("model", "batch", NUM_ITEMS):
            raise ConfigError(f"frozen[{name!r}]: the names of frozen modules are step_fn's keyword arguments, so "
                              f"they must be Python identifiers other than model, batch and {NUM_ITEMS}.",
                              key="frozen")
        if not (accepts(step_fn, name) or _takes_var_kwargs(step_fn)):
            raise ConfigError(f"step_fn does not take a {name!r} argument, but frozen[{name!r}] would be passed as "
                              f"one: add `{name}` to step_fn's parameters.", key="frozen")
        if any(id(p) in trained_params for p in module.parameters()):
            raise ConfigError(f"frozen[{name!r}] shares parameters with the model being trained: they would be "
                              f"trained and frozen at once. Pass a separate copy (copy.deepcopy(model)).",
                              key="frozen")
        devices = {t.device for t in list(module.parameters()) + list(module.buffers())}
        if any(d.type == "meta" for d in devices):
            raise ConfigError(f"frozen[{name!r}] has parameters on the meta device, i.e. no weights: load its weights "
                              f"(e.g. from a checkpoint) before passing it.", key="frozen")
        if len(devices) > 1:
            raise ConfigError(f"frozen[{name!r}] is spread over several devices ({', '.join(sorted(map(str, devices)))})."
                              f" distrain places each frozen module whole on every rank's own device ({device} "
                              f"here), as it does the model: pass it on one device (the CPU is fine).",
                              key="frozen")
        if devices and next(iter(devices)) != device:
            get_logger().info(f"frozen module {name!r} moved from {next(iter(devices))} to {device}")
        module = module.to(device).eval().requires_grad_(False)
        out[name] = FrozenModule(name, module)
    return out
