"""The strategy contract: the one abstract class every strategy implements; nothing outside strategies/ calls more.

A strategy owns what differs between DDP, ZeRO, FSDP, DeepSpeed, Accelerate and local SGD: how the model
and optimizer are wrapped, how backward accumulates (and when gradients are synchronised), clipping, the
optimizer step, parameter synchronisation, and how the state is gathered or saved. Read top to bottom:

1. capability flags (class attributes): what the trainer, the checkpointer and the planner may expect;
2. ``setup`` (the one abstract method): wrap the model, build the optimizer;
3. the step: forward context, accumulation, backward, clipping, norms, the update;
4. an engine's tensors seen from outside (``local_tensor``, ``param_shape``, ``scalar``): the only way code
   outside strategies/ reads a sharded parameter or an engine's result, so DTensor and DeepSpeed details stay here;
5. state and checkpoints;
6. out of memory under ``train.micro_batch: auto``: rejoining the peers, dropping the step, another micro-batch.

What differs per engine lives in the engine's file only.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Iterable, List, Optional, Union

import torch
from omegaconf import DictConfig
from torch import nn

from distrain import dist
from distrain.checkpoint import dcp_io
from distrain.checkpoint.paths import DCP_DIR
from distrain.config import BatchPlan
from distrain.config.options import parse_options
from distrain.env import ProcessInfo
from distrain.models.meta_init import is_meta, materialise
from distrain.strategies import precision
from distrain.models.activation_checkpointing import apply_activation_checkpointing
from distrain.models.compile import apply_compile
from distrain.optim import build_optimizer, param_groups

if TYPE_CHECKING:
    from distrain.strategies.placement import Layout


@dataclass
class StrategyContext:
    """Everything a strategy may need to know about the run, resolved before it is built."""

    info: ProcessInfo
    device: torch.device
    plan: BatchPlan
    train: DictConfig  # the train section: optimizer, lr, clipping, precision
    seed: int


class Strategy(abc.ABC):
    """What a strategy is; a subclass sets the flags that differ and implements ``setup``."""

    # --- capability flags ----------------------------------------------------------------------------
    name = "base"  # the registry name (strategy.name), for messages
    # W ranks reproduce 1 rank with accumulation, to float rounding (`distrain verify` checks it); see exact_for.
    exact = True
    # Whether it needs torch.distributed's process group when W > 1 (False: it brings its own, or runs alone).
    needs_process_group = True
    # Whether setup() accepts a model still on the meta device (distrain.models.meta_init) and brings it to life
    # itself, after wrapping or sharding it. The built-in strategies do; a user's own strategy gets a built model.
    meta_init = False
    # How the engine combines gradients across ranks: "sum" (the default: what keeps W ranks equal to one rank) or
    # "mean" (the engine divides by the world size, and backward multiplies it back; see loss_factor).
    grad_reduction = "sum"
    # True where the engine clips, measures the gradient norm and applies the update in one call (DeepSpeed): the
    # norm is known only after step(), and a step cannot be skipped from outside (train.on_nonfinite=skip_step).
    opaque_step = False
    # The Checkpointer owns a save's temporary folder, its hashes, commit and retention; the strategy writes its
    # model and optimizer state into it. By default that is DCP shards (every rank its own, resharded on load at
    # any world size). A strategy whose engine has a format of its own (DeepSpeed) sets engine_checkpoint and
    # overrides save_checkpoint and load_checkpoint; its saves are synchronous.
    engine_checkpoint = False
    # Whether its DCP state is torch's FQN-keyed get_state_dict view ({"model": {fqn: ...}, "optim": {"state": {fqn:
    # {...}}, "param_groups": [...]}}, whole tensors, DTensor shards or a rank's owned entries alike): a resume may
    # then switch to any other such strategy (distrain.checkpoint.conversion). False for a layout of its own.
    portable_checkpoint = True
    # Payload bytes this rank has handed to collectives for gradient/parameter sync so far (None: not counted).
    comm_bytes: Optional[int] = None
    # Whether train.micro_batch=auto may redo a step that ran out of memory on some rank (section 6 below); where
    # it may not, the reason, completing "train.micro_batch=auto is not supported by strategy.name=X: ..." (exit 2).
    supports_auto_micro_batch = False
    auto_micro_batch_refusal = "it cannot bring a rank that ran out of memory back in step with its peers' collectives"

    def __init__(self, ctx: StrategyContext):
        self.ctx = ctx
        self.model: nn.Module  # what the trainer calls forward on
        self.optimizer: torch.optim.Optimizer
        precision.check_precision(ctx.train.precision, ctx.device)
        self._precision = str(ctx.train.precision)  # read once: forward_context runs every micro-step
        # fp16's dynamic loss scale (None for fp32/bf16); engines with their own scaler set it to None.
        self.grad_scaler: Optional[torch.amp.GradScaler] = precision.grad_scaler(ctx.train.precision, ctx.device)

    # --- setup -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self, model: nn.Module) -> None:
        """Place and wrap ``model``, then build the optimizer over the (possibly sharded) parameters."""
        raise NotImplementedError

    def _on_device(self, model: nn.Module, device: Optional[torch.device] = None) -> nn.Module:
        """``model`` on ``device`` (default: the run's): a meta-built model is initialised there with its eager
        values (distrain.models.meta_init), an already built one is moved."""
        device = device or self.ctx.device
        if is_meta(model):
            materialise(model, device)
            return model
        return model.to(device)

    def _checkpoint_and_compile(self, model: nn.Module) -> None:
        """train.activation_checkpointing, then train.compile, on the model's blocks, in place and in that order
        (torchtitan's and Accelerate's); strategies call it before wrapping or sharding (DeepSpeed: see there)."""
        train = self.ctx.train
        apply_activation_checkpointing(model, train.activation_checkpointing, train.blocks)
        if train.compile:
            apply_compile(model, train.compile_options, train.blocks)

    def _build_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """train.optimizer over ``model``'s parameters (after wrapping/sharding), in the weight-decay groups every
        strategy uses (distrain.optim.param_groups)."""
        groups = param_groups(model, self.ctx.train, shape=self.param_shape)
        return build_optimizer(groups, self.ctx.train, self.ctx.device)

    # --- the step ----------------------------------------------------------------------------------
    def forward_context(self) -> ContextManager:
        """Autocast for bf16/fp16 where the engine has no mixed-precision mechanism of its own."""
        return precision.autocast(self._precision, self.ctx.device)

    def accumulate(self, last_micro_step: bool) -> ContextManager:
        """Context around one micro-step's forward+backward; gradients sync only on the last one."""
        return contextlib.nullcontext()

    def loss_factor(self) -> int:
        """What the engine's own reductions divide a micro-batch's gradient by, so ``backward`` multiplies it back.

        1 where gradients are summed over micro-batches and ranks: every micro-batch's share of the objective (its
        summed item losses / the step's global item count) then adds up to the global-batch mean, and W ranks add
        exactly the terms one rank adds, only in another order. The world size where the engine averages.
        """
        return 1 if self.grad_reduction == "sum" else self.ctx.plan.world_size

    def _scaled(self, loss: torch.Tensor, scale: Union[float, torch.Tensor]) -> torch.Tensor:
        """``loss x scale x loss_factor()`` with one multiplication (none when the product is 1).

        For a mean loss the scale is micro/global, a double: one rounding, as one rank's own scaling rounds.
        """
        factor = self.loss_factor()
        if isinstance(scale, float) and scale == 1.0 and factor == 1:
            return loss
        return loss * (scale * factor if factor != 1 else scale)

    def backward(self, loss: torch.Tensor, scale: Union[float, torch.Tensor] = 1.0) -> None:
        """Backward of ``loss x scale``, this micro-batch's share of the step's objective (see
        distrain.training.objective), so the synchronised gradient is the gradient of the global-batch mean."""
        loss = self._scaled(loss, scale)
        (self.grad_scaler.scale(loss) if self.grad_scaler else loss).backward()

    def clip_grad_norm(self, max_norm: float) -> Optional[torch.Tensor]:
        """Clip the global gradient norm to ``max_norm`` (0 = off); returns the norm before clipping."""
        if max_norm <= 0:
            return None
        if self.grad_scaler:
            self.grad_scaler.unscale_(self.optimizer)  # clip the true gradients, not the loss-scaled ones
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)

    def grad_norm(self) -> float:
        """The global L2 norm of the gradients the next step applies, leaving them untouched (for logging).

        Call it on every rank: DTensor gradient shards (FSDP2) give per-shard norms that torch combines across
        the mesh with a collective. fp16 gradients are still loss-scaled here, so the scale is divided out.
        Engines that keep gradients outside ``p.grad`` (DeepSpeed ZeRO-2/3) override this.
        """
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return 0.0
        norm = self.scalar(torch.nn.utils.get_total_norm(grads, norm_type=2.0))
        if self.grad_scaler:
            norm = norm / self.grad_scaler.get_scale()
        return norm

    def step(self) -> None:
        """Apply the optimizer update and clear the gradients."""
        if self.grad_scaler:
            self.grad_scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed; then the scale drops
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip_step(self) -> None:
        """Drop this step's gradients without an update (train.on_nonfinite=skip_step); called on every rank alike."""
        if self._precision == "fp16":
            self.step()  # fp16's loss scaler skips an update whose gradients are not finite, and lowers its scale
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def sync(self, step: int) -> None:
        """Synchronise parameters after the update, for strategies that do not sync gradients (local SGD)."""

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # --- an engine's tensors, seen from outside ----------------------------------------------------
    def local_tensor(self, param: torch.Tensor) -> torch.Tensor:
        """The part of ``param`` this rank holds: the shard of a DTensor (FSDP2), else the tensor itself. Engines
        that keep the shard apart from the parameter (DeepSpeed ZeRO-3) override it."""
        return param.to_local() if hasattr(param, "to_local") else param

    def param_shape(self, param: torch.Tensor) -> torch.Size:
        """The shape of the whole parameter (as the model declares it), whatever this rank holds of it."""
        return param.shape

    def scalar(self, value: Union[float, torch.Tensor]) -> float:
        """A scalar the engine returned (a gradient norm) as a float; a DTensor's partial value is reduced over
        the mesh first (a collective: call it on every rank)."""
        if hasattr(value, "full_tensor"):  # DTensor: the partial values of the shards, reduced over the mesh
            value = value.full_tensor()
        return float(value)

    def nonfinite_weight_ranks(self) -> List[int]:
        """The ranks whose weights (their local shards) hold a nan or inf; the same list on every rank (collective)."""
        device = self.ctx.device
        flags = [torch.isfinite(local.detach()).all().logical_not()
                 for local in map(self.local_tensor, self.model.parameters()) if local.numel()]
        bad = torch.stack([f.to(device) for f in flags]).any().float() if flags else torch.zeros((), device=device)
        return [r for r, v in enumerate(dist.per_rank(bad.to(device))) if v]

    # --- state -------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The user's model inside the wrapper (for eval/inference and naming)."""
        return getattr(self.model, "module", self.model)

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Consolidated full weights on CPU, complete on rank 0 (other ranks may get an empty dict)."""
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    # --- checkpoints -------------------------------------------------------------------------------
    def save_checkpoint(self, directory: Path, step: int, asynchronous: bool = False,
                        group: Optional[Any] = None) -> Optional[Any]:
        """Write this rank's model and optimizer state into checkpoint ``directory`` (dcp/); ``asynchronous``: in
        DCP's background thread, collectives on ``group``, returning its future."""
        return dcp_io.save_state(self.checkpoint_state(), directory / DCP_DIR, step, asynchronous, group)

    def load_checkpoint(self, directory: Path) -> None:
        """Load this rank's model and optimizer state from checkpoint ``directory`` (what save_checkpoint wrote)."""
        target = self.checkpoint_state()
        dcp_io.load_state(target, directory / DCP_DIR)
        self.load_checkpoint_state(target)

    def checkpoint_state(self) -> Dict[str, Any]:
        """Model and optimizer state for torch.distributed.checkpoint (DCP); sharded where the strategy shards.

        torch's state_dict helpers see through DDP and FSDP2 wrappers and give DCP the keys it reshards by.
        """
        # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state, **self._scaler_state()}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        """Load what ``checkpoint_state`` produced (after DCP filled it in place)."""
        # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self._load_scaler_state(state)

    def _scaler_state(self) -> Dict[str, Any]:
        """fp16's loss scale and growth tracker, so a resumed run does not restart the scale search."""
        return {"grad_scaler": self.grad_scaler.state_dict()} if self.grad_scaler else {}

    def _load_scaler_state(self, state: Dict[str, Any]) -> None:
        if self.grad_scaler and state.get("grad_scaler"):
            self.grad_scaler.load_state_dict(state["grad_scaler"])

    def state_tensors(self) -> Dict[str, Iterable[torch.Tensor]]:
        """This rank's parameters, gradients and optimizer state tensors, for memory accounting.

        A gradient counts as big as its (local shard of the) parameter whether or not it is allocated at this
        instant: DDP keeps it in its buckets between steps, FSDP re-creates it every backward; either way it is
        memory the step needs. Optimizer state is what the optimizer holds now (Adam allocates it on step 1).
        """
        params = [p for p in self.model.parameters()]
        return {
            "params": params,
            "grads": [p.grad if p.grad is not None else p for p in params if p.requires_grad],
            "optimizer": [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)],
        }

    def memory_report(self) -> Dict[str, int]:
        """Bytes of parameters, gradients and optimizer state held by this rank (shards count as local)."""
        return {kind: sum(_local_bytes(t) for t in tensors) for kind, tensors in self.state_tensors().items()}

    # --- out of memory under train.micro_batch=auto (distrain.training.micro_steps, docs/out-of-memory.md) ------
    # The loop calls these only where supports_auto_micro_batch is set. A rank that ran out of memory stops its
    # micro-steps; the loop then calls, on that rank only, rejoin_after_oom; then on every rank the outcome is
    # shared (outcome_channel, or one all-reduce), and after a failure anywhere drop_step and use_plan on every rank.
    def rejoin_after_oom(self, micro: int, micro_steps: int, phase: str, replay: Callable[[], Any]) -> bool:
        """On a rank whose micro-step ``micro`` (0-based, of ``micro_steps``) raised out of memory in ``phase``
        (``forward`` | ``backward``): issue, in their order, every collective its peers still run in this step's
        forwards and backwards (the rest of micro-step ``micro`` and all later ones), so none of them waits;
        what they compute is thrown away (``drop_step`` follows on every rank). Called outside ``accumulate``,
        after the failed micro-step's activations are released. ``replay()``: the loss of one sample of the
        failed micro-batch (the model's forward, as cheap as it gets), for an engine whose collectives only its
        own forward and backward hooks issue (FSDP); each call is a new forward. False where it cannot: the step
        is then not redone and every rank ends in one paragraph. Here: no collective rides a forward or backward."""
        return True

    def outcome_channel(self) -> Optional[Any]:
        """Where whether any rank's step attempt failed rides inside the last gradient collective, so
        micro_batch=auto costs no collective of its own once settled: an object with ``arm()`` (called before the
        first micro-step), ``fail()`` (on a failed rank, before ``rejoin_after_oom``), ``carried`` and
        ``any_failed()`` (after the last backward; DDP's is ddp_join.Outcome). None, or not carried: micro_steps
        all-reduces every rank's outcome itself."""
        return None

    def drop_step(self) -> None:
        """Drop a failed step's gradients on every rank alike (and any engine state the attempt advanced, such
        as a micro-step counter): the step is redone from its first micro-step, with the same samples."""
        self.optimizer.zero_grad(set_to_none=True)

    def use_plan(self, plan: BatchPlan) -> None:
        """Train at ``plan``'s micro-batch from now on (a smaller one after an OOM, or the one a checkpoint
        trained at); the global batch is the same, the accumulation count changes."""
        self.ctx.plan = plan

    @classmethod
    def layouts(cls) -> List["Layout"]:
        """How this strategy places model states and what it sends per step, for `distrain plan` (one Layout per
        option set worth comparing). A strategy that declares none is not planned."""
        return []

    @classmethod
    def check_world(cls, kwargs: Dict[str, Any], world_size: int) -> None:
        """Before any worker starts: raise ConfigError if these strategy.kwargs cannot run at ``world_size`` (called
        for each size an elastic job may have). Most strategies run at any world size."""

    @classmethod
    def exact_for(cls, kwargs: Dict[str, Any]) -> bool:
        """Whether this strategy with these strategy.kwargs should reproduce 1 rank (lossy options say no)."""
        return cls.exact

    def teardown(self) -> None:
        """Release engine resources (hooks, threads)."""


def _local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # DTensor shards (FSDP2)
    if local.numel() == 1 and local.dim() == 0:  # optimizer step counters and scalars
        return local.element_size()
    return local.numel() * local.element_size()


def make_strategy(cls: type, ctx: StrategyContext, kwargs: Dict[str, Any]) -> Strategy:
    """Build ``cls(ctx, **kwargs)`` with kwargs checked against the typed options of its constructor."""
    options = parse_options(cls.__init__, kwargs, "strategy.kwargs", f"strategy {cls.name!r}", skip=("self", "ctx"))
    return cls(ctx, **options)
