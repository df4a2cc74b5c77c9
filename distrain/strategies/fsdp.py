"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer state sharded over ranks.

Each shard unit (a transformer block, then the root for what is left) all-gathers its parameters just before
its forward and reduce-scatters its gradients right after its backward, so a rank holds about 1/W of the model
between steps. ``reshard_after_forward=True`` frees the gathered parameters after forward and gathers them again
for backward (ZeRO-3); ``False`` keeps them until backward (ZeRO-2-like: less communication, more memory).

Wrapping policy (``wrap``): "auto" shards every child of an ``nn.ModuleList`` as its own unit (the usual
container of transformer blocks: the built-in GPT's ``blocks``; the MLP, CNN and LSTM have none and become one
unit), then the root. A list of class names instead shards every submodule of those classes, e.g.
``strategy.kwargs.wrap=[Block]`` for a user's model.

Sharded from birth: a model built on the meta device (distrain.models.meta_init) is checkpointed, compiled and
sharded there, and only then materialised: ``to_empty`` allocates each rank's shards, and every parameter's
initial value is replayed on the CPU and cut to this rank's shard. No rank ever holds the whole model.

HSDP (``replicate``): R > 1 lays the W ranks out as a 2-D mesh of R replicas x S = W/R shards (torchtitan's
data_parallel_replicate/shard degrees). Parameters are sharded over the S ranks of a replica only, so the all-gathers
and reduce-scatters stay inside it (a node, with ``auto``: ranks are numbered node by node), and only the
reduce-scattered gradient shards are all-reduced across replicas (over the slow network). Ranks r*S..(r+1)*S-1 form
replica r. DCP saves one copy of each shard (its planner drops the replicas' duplicates), so a checkpoint is the
same size as plain FSDP's and resumes on any mesh and world size.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from distrain.config.options import Range
from distrain.errors import ConfigError
from distrain.models.blocks import AUTO, find_blocks
from distrain.models.meta_init import is_meta, materialise
from distrain.strategies import precision
from distrain.strategies.fsdp_oom import HSDP_UNCOUNTED, FSDPOomRecovery, reset_after_oom
from distrain.strategies.placement import AUTO_REPLICATE, SHARD, Layout
from distrain.strategies.base import Strategy, StrategyContext


class FSDPStrategy(Strategy):
    name = "fsdp"
    meta_init = True

    @classmethod
    def layouts(cls) -> List[Layout]:
        # Both reshard modes keep parameters, gradients and optimizer state sharded between steps (FSDP2 reshards
        # after backward); they differ in what a step gathers transiently and how often.
        return [Layout("fsdp (shard grad op)", cls.name, {"reshard_after_forward": False}, SHARD, SHARD, SHARD,
                       sharded_reduce=True, gathers_per_micro_step=1.0, peak_unsharded="model", speed_rank=3),
                Layout("fsdp (full shard)", cls.name, {"reshard_after_forward": True}, SHARD, SHARD, SHARD,
                       sharded_reduce=True, gathers_per_micro_step=2.0, peak_unsharded="unit", speed_rank=5),
                # HSDP, one replica per node: planned where the job has several nodes (`distrain plan --nodes`).
                Layout("hsdp (full shard)", cls.name, {"reshard_after_forward": True, "replicate": "auto"}, SHARD,
                       SHARD, SHARD, sharded_reduce=True, gathers_per_micro_step=2.0, peak_unsharded="unit",
                       speed_rank=6, replicate=AUTO_REPLICATE)]

    @classmethod
    def check_world(cls, kwargs: Dict[str, Any], world_size: int) -> None:
        """Before any worker starts: a numeric strategy.kwargs.replicate must divide ``world_size``."""
        replicas(kwargs.get("replicate", 1), world_size, local_world_size=None)

    def __init__(self, ctx: StrategyContext, reshard_after_forward: bool = True,
                 wrap: Union[str, Sequence[str]] = "auto", offload: bool = False,
                 replicate: Annotated[Union[int, str], Range(ge=1, note="the number of model replicas, or auto: one "
                                                                        "per node")] = 1):
        super().__init__(ctx)
        self.replicate = replicas(replicate, ctx.info.world_size, ctx.info.local_world_size)
        if not isinstance(reshard_after_forward, bool):
            raise ConfigError(f"strategy.kwargs.reshard_after_forward={reshard_after_forward!r} must be true "
                              f"(ZeRO-3: free gathered parameters after forward) or false (ZeRO-2-like: keep them "
                              f"until backward).", key="strategy.kwargs.reshard_after_forward")
        if offload and ctx.device.type != "cuda":
            raise ConfigError("strategy.kwargs.offload=true moves FSDP's shards to host memory between uses, which "
                              "only means something on a GPU; this run is on the CPU already. Remove it, or run "
                              "on a GPU.", key="strategy.kwargs.offload")
        self.reshard_after_forward = reshard_after_forward
        self.wrap_policy = wrap if isinstance(wrap, str) else [str(name) for name in wrap]
        self.offload = offload
        self.grad_scaler = precision.grad_scaler(ctx.train.precision, ctx.device, sharded=True)
        self.units: List[FSDPModule] = []
        self.oom: Optional[FSDPOomRecovery] = None  # counts FSDP's collectives per micro-step (fsdp_oom)

    def setup(self, model: nn.Module) -> None:
        sharded_from_birth = is_meta(model)
        if not sharded_from_birth:
            model = model.to(self.ctx.device)
        self._checkpoint_and_compile(model)  # per block, before fully_shard (see distrain.models.compile)
        kwargs: Dict[str, Any] = dict(mesh=self._mesh(), reshard_after_forward=self.reshard_after_forward,
                                      offload_policy=CPUOffloadPolicy() if self.offload else OffloadPolicy())
        for unit in self._units(model):  # bottom-up: blocks first, the root takes what is left
            fully_shard(unit, mp_policy=self._mixed_precision(root=False), **kwargs)
        fully_shard(model, mp_policy=self._mixed_precision(root=True), **kwargs)
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in self.units:
            # Sum, never average: the loss is pre-scaled by micro/global (grad_reduction "sum"), which is what
            # keeps W ranks equal to 1 rank. Forcing SUM also avoids PREMUL_SUM, which gloo does not have.
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        if sharded_from_birth:  # each rank allocates and initialises only its shards (host memory with offload)
            materialise(model, torch.device("cpu") if self.offload else self.ctx.device)
        self.model = model
        self.optimizer = self._build_optimizer(model)  # over the DTensor shards
        self.oom = FSDPOomRecovery(model)  # a counter per collective: what lets a rank that ran out of memory rejoin

    def _mesh(self) -> DeviceMesh:
        """1-D over every rank (FSDP), or 2-D replicas x shards (HSDP): FSDP2 reads the placement from its shape."""
        world = self.ctx.info.world_size
        if self.replicate == 1:
            return init_device_mesh(self.ctx.device.type, (world,))
        return init_device_mesh(self.ctx.device.type, (self.replicate, world // self.replicate),
                                mesh_dim_names=("replicate", "shard"))

    def _units(self, model: nn.Module) -> List[nn.Module]:
        if isinstance(self.wrap_policy, str) and self.wrap_policy != AUTO:
            raise ConfigError(f"strategy.kwargs.wrap={self.wrap_policy!r} is not a policy. Use auto (every child of "
                              f"an nn.ModuleList) or a list of module class names, e.g. [Block].",
                              key="strategy.kwargs.wrap")
        return find_blocks(model, self.wrap_policy, key="strategy.kwargs.wrap")

    def _mixed_precision(self, root: bool) -> MixedPrecisionPolicy:
        if self.ctx.train.precision == "fp32":
            return MixedPrecisionPolicy()
        # Compute in low precision and reduce gradients in fp32; the sharded parameters the optimizer steps stay
        # fp32. Only the root returns fp32 (the loss is taken in fp32): inner units hand low-precision
        # activations to the next layer, whose parameters are low precision too.
        return MixedPrecisionPolicy(param_dtype=precision.compute_dtype(self.ctx.train.precision),
                                    reduce_dtype=torch.float32, output_dtype=torch.float32 if root else None)

    # --- the step ----------------------------------------------------------------------------------
    def forward_context(self) -> ContextManager:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts; autocast on top would only add casts

    def accumulate(self, last_micro_step: bool) -> ContextManager:
        # Earlier micro-steps accumulate unsharded gradients locally; the last one reduce-scatters their sum.
        self.model.set_requires_gradient_sync(last_micro_step)
        self.oom.begin_micro_step()  # the ledger counts this micro-step's collectives (fsdp_oom)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scale: Union[float, torch.Tensor] = 1.0) -> None:
        super().backward(loss, scale)
        self.oom.begin_micro_step()  # all of this micro-step's collectives went out: an OOM from here owes the next

    # --- out of memory under train.micro_batch=auto (fsdp_oom; docs/out-of-memory.md, section FSDP) ---------
    @property
    def supports_auto_micro_batch(self) -> bool:  # type: ignore[override]
        return self.replicate == 1

    @property
    def auto_micro_batch_refusal(self) -> str:  # type: ignore[override]
        return (f"strategy.kwargs.replicate={self.replicate} makes it HSDP, which {HSDP_UNCOUNTED}, so a rank that ran "
                f"out of memory cannot be brought back in step; strategy.kwargs.replicate=1 (plain FSDP) can")

    def rejoin_after_oom(self, micro: int, micro_steps: int, phase: str, replay: Callable[[], Any]) -> bool:
        """On the rank that ran out of memory in micro-step ``micro`` of ``micro_steps`` (the first whose backward
        did not return; ``phase`` does not matter: the ledger knows what was issued): issue the all-gathers and
        reduce-scatters its peers still expect this step, and leave FSDP ready for the redo. ``replay()``: the
        model's forward (or loss) on one sample (fsdp_oom.first_sample of the batch). Every rank then learns the
        outcome (micro_steps' outcome all-reduce) and drops the step (``drop_step``). An OOM inside the replay
        itself propagates: this rank's run ends, and its peers at dist.timeout_s."""
        self.oom.owed_collectives_after_oom(replay, micro, micro_steps)
        return True

    def drop_step(self) -> None:
        super().drop_step()
        reset_after_oom(self.model)  # every rank's FSDP state back to idle and resharded alike before the redo

    def clip_grad_norm(self, max_norm: float) -> Optional[torch.Tensor]:
        if max_norm <= 0:
            return None
        if self.grad_scaler:
            self.grad_scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        # Each rank holds shards: the DTensor norm is a partial one until it is reduced over ranks.
        total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # --- state -------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self.model  # fully_shard changes the module's class in place; there is no wrapper to look through

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # All-gathers shard by shard onto rank 0's CPU memory; other ranks get an empty dict.
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def replicas(replicate: Union[int, str], world_size: int, local_world_size: Optional[int]) -> int:
    """strategy.kwargs.replicate as a number of replicas R dividing ``world_size``: ``auto`` is one per node (W /
    LOCAL_WORLD_SIZE; None: not known yet, before launch). One process has nothing to shard or replicate: 1."""
    key = "strategy.kwargs.replicate"
    if replicate == "auto":
        if local_world_size is None or world_size == 1:
            return 1
        if world_size % local_world_size:
            raise ConfigError(f"{key}=auto makes one replica per node, but the world size {world_size} is not a "
                              f"multiple of the ranks per node ({local_world_size}, LOCAL_WORLD_SIZE): the nodes "
                              f"differ. Start the same number of ranks on every node, or set {key} to a number "
                              f"that divides {world_size}.", key=key)
        return world_size // local_world_size
    if isinstance(replicate, bool) or not isinstance(replicate, int) or replicate < 1:
        raise ConfigError(f"{key}={replicate!r} is not allowed: it must be auto (one replica per node) or a whole "
                          f"number of replicas >= 1 that divides the world size (1 = plain FSDP).", key=key)
    if world_size > 1 and world_size % replicate:
        allowed = ", ".join(str(r) for r in divisors(world_size))
        raise ConfigError(f"{key}={replicate} does not divide the world size {world_size}: HSDP lays the ranks out as "
                          f"{replicate} replicas of equal shard groups. Allowed at world size {world_size}: {allowed} "
                          f"or auto (one replica per node).", key=key)
    return replicate if world_size > 1 else 1


def divisors(n: int) -> Tuple[int, ...]:
    """The numbers of replicas ``n`` ranks can form."""
    return tuple(d for d in range(1, n + 1) if n % d == 0)
