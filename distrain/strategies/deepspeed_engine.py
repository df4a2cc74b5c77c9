"""DeepSpeed: ``deepspeed.initialize`` with ZeRO stage 0-3 and offload, its config generated from ours.

The user writes one config. Batch sizes and accumulation come from the batch plan, clipping and precision from
``train.*``, the stage and offload from ``strategy.kwargs``; extra DeepSpeed keys pass through
``strategy.kwargs.config`` (for example ``{zero_optimization: {overlap_comm: true}}``). The optimizer is the
same torch optimizer every strategy builds (DeepSpeed steps it over its flat fp32 partitions), so every stage
runs the same update rule as DDP; with optimizer offload, DeepSpeed's own CPU Adam replaces it (its fused kernel
is why offload is worth it).

DeepSpeed's accumulation model: ``engine.backward`` and ``engine.step`` on every micro-batch; the engine
counts micro-steps and only the step on the accumulation boundary reduces and updates. ``backward`` here makes
the non-boundary ``engine.step`` calls, ``step`` makes the boundary one.

Exactness: stages 0-2 reduce gradients as a SUM (``gradient_allreduce_op: sum``) of every micro-batch's share
of the step's objective, like DDP, so W ranks match one rank to float rounding. Stage 3 only averages (DeepSpeed
refuses SUM there): the share is multiplied by W and the engine divides by W, one extra rounding per step.

Sharded from birth: a model built on the meta device (distrain.models.meta_init) is built again at stage 3 inside
``deepspeed.zero.Init``, from the same factory and generator state: DeepSpeed partitions each module's
parameters as soon as its constructor returns, so no rank holds the whole model, and since the constructors
draw exactly what an eager build draws (checked on the meta device first), the partitions hold the eager values
(in fp32; with bf16/fp16 zero.Init creates, and so initialises, the parameters in that precision). Stages 0-2
keep a replica per rank: the model is materialised straight onto the device. ``train.compile`` compiles the
blocks of ``engine.module`` in place after ``deepspeed.initialize``, as Accelerate does; activation
checkpointing is applied before.

On a machine without CUDA, ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported (it picks its
accelerator at import). The first start JIT-compiles a small communication op (~30 s); later starts reuse it.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Annotated, Any, ContextManager, Dict, List, Mapping, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import save_file
import torch
from torch import nn

from distrain.config.options import Range
from distrain.env import ProcessInfo
from distrain.checkpoint.paths import CONSOLIDATED, ENGINE_DIR
from distrain.errors import CheckpointError, ConfigError
from distrain.strategies.host_memory import freed_memory_returned
from distrain.models.meta_init import is_meta, meta_init_of
from distrain.strategies.placement import FULL, SHARD, Layout
from distrain.models.activation_checkpointing import apply_activation_checkpointing
from distrain.models.compile import apply_compile
from distrain.optim import build_optimizer, optimizer_kwargs, param_groups
from distrain.strategies.base import Strategy, StrategyContext, _local_bytes

# Keys that our config owns: set them through train.* / strategy.kwargs, never twice.
OWNED_KEYS = {
    "train_batch_size": "train.global_batch", "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch / train.micro_batch", "gradient_clipping": "train.grad_clip",
    "optimizer": "train.optimizer", "scheduler": "train.lr_schedule", "bf16": "train.precision",
    "fp16": "train.precision", "gradient_allreduce_op": "(chosen per stage for exactness)",
}
CHECKPOINT_TAG = "deepspeed"
ZERO_STAGES = "the ZeRO stage: 0 plain data parallel, 1 optimizer state sharded, 2 + gradients, 3 + parameters"


def import_deepspeed() -> Any:
    """Import DeepSpeed, telling it to run on the CPU when there is no CUDA (it decides at import time)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # lazy: start-up: DeepSpeed takes seconds to import

    return deepspeed


class DeepSpeedStrategy(Strategy):
    name = "deepspeed"
    auto_micro_batch_refusal = ("DeepSpeed owns the micro-batch (train_micro_batch_size_per_gpu, fixed when its "
                                "engine is built) and its own gradient accumulation")
    engine_checkpoint = True
    opaque_step = True  # engine.step() clips, measures the gradient norm and updates in one call
    meta_init = True

    @classmethod
    def layouts(cls) -> List[Layout]:
        ds = dict(strategy=cls.name, half_precision_states=True)
        return [
            Layout("deepspeed stage 0", kwargs={"stage": 0}, master_half=FULL, speed_rank=1, **ds),
            Layout("deepspeed stage 1", kwargs={"stage": 1}, optimizer=SHARD, master_fp32=SHARD, master_half=SHARD,
                   gathers_per_step=1.0, speed_rank=3, **ds),
            Layout("deepspeed stage 2", kwargs={"stage": 2}, grads=SHARD, optimizer=SHARD, master_fp32=SHARD,
                   master_half=SHARD, reduce_every_micro_step=True, sharded_reduce=True, gathers_per_step=1.0,
                   speed_rank=4, **ds),
            Layout("deepspeed stage 3", kwargs={"stage": 3}, params=SHARD, grads=SHARD, optimizer=SHARD,
                   master_fp32=SHARD, master_half=SHARD, reduce_every_micro_step=True, sharded_reduce=True,
                   gathers_per_micro_step=1.0, regather_in_backward_above=1e9, peak_unsharded="model", speed_rank=6,
                   **ds),
        ]

    def __init__(self, ctx: StrategyContext, stage: Annotated[int, Range(one_of=(0, 1, 2, 3), note=ZERO_STAGES)] = 0,
                 offload_optimizer: bool = False, offload_param: bool = False,
                 config: Optional[Mapping[str, Any]] = None):
        super().__init__(ctx)
        if offload_optimizer and stage == 0:
            raise ConfigError("strategy.kwargs.offload_optimizer=true needs ZeRO: set strategy.kwargs.stage to 1, 2 "
                              "or 3.", key="strategy.kwargs.offload_optimizer")
        if offload_param and stage != 3:
            raise ConfigError("strategy.kwargs.offload_param=true offloads sharded parameters, which only ZeRO stage "
                              "3 has: set strategy.kwargs.stage=3.", key="strategy.kwargs.offload_param")
        self.stage = stage
        self.offload_optimizer = offload_optimizer
        self.offload_param = offload_param
        self.extra = _plain(config or {})
        clashes = sorted(set(self.extra) & set(OWNED_KEYS))
        if clashes:
            raise ConfigError(f"strategy.kwargs.config.{clashes[0]} is derived from distrain's own config "
                              f"({OWNED_KEYS[clashes[0]]}); set it there so both engines agree. Pass only other "
                              f"DeepSpeed keys through strategy.kwargs.config.", key=f"strategy.kwargs.config.{clashes[0]}")
        if "stage" in self.extra.get("zero_optimization", {}):
            raise ConfigError("strategy.kwargs.config.zero_optimization.stage duplicates strategy.kwargs.stage; set "
                              "only strategy.kwargs.stage.", key="strategy.kwargs.config.zero_optimization.stage")
        self.grad_scaler = None  # DeepSpeed scales fp16 losses itself
        # SUM keeps W ranks equal to one rank; ZeRO-3 only offers the mean (see the module docstring).
        self.grad_reduction = "sum" if stage < 3 else "mean"
        self.engine: Any = None
        self._set_local_rank = False
        self._last_micro_step = True
        self._norm = torch.full((), float("nan"))

    # --- setup -------------------------------------------------------------------------------------
    def ds_config(self) -> Dict[str, Any]:
        """The DeepSpeed config this run uses: derived from ours, then the user's extra keys merged in."""
        plan, train = self.ctx.plan, self.ctx.train
        zero: Dict[str, Any] = {"stage": self.stage}
        if self.stage == 3:
            # DeepSpeed keeps parameters under 1e5 elements whole on every rank by default, which for small
            # models means nothing is sharded; shard everything unless the user raises it.
            zero["stage3_param_persistence_threshold"] = 0
        if self.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.ctx.device.type == "cuda"}
        if self.offload_param:
            zero["offload_param"] = {"device": "cpu", "pin_memory": self.ctx.device.type == "cuda"}
        config: Dict[str, Any] = {
            "train_batch_size": plan.global_batch,
            "train_micro_batch_size_per_gpu": plan.micro_batch,
            "gradient_accumulation_steps": plan.grad_accum,
            "gradient_clipping": float(train.grad_clip),
            "gradient_allreduce_op": self.grad_reduction,
            "bf16": {"enabled": train.precision == "bf16"},
            "fp16": {"enabled": train.precision == "fp16"},
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,  # torch's SGD steps flat partitions like any other tensor
            "steps_per_print": 2**31 - 1,  # distrain logs; keep DeepSpeed's own progress lines out of the way
        }
        if self.offload_optimizer and train.optimizer in ("adam", "adamw"):
            kwargs = optimizer_kwargs(train)
            config["optimizer"] = {"type": "AdamW" if train.optimizer == "adamw" else "Adam",
                                   "params": {**kwargs, "adam_w_mode": train.optimizer == "adamw"}}
        elif self.offload_optimizer:
            config["zero_force_ds_cpu_optimizer"] = False  # SGD has no DeepSpeed CPU kernel: torch's steps on CPU
        return _merge(config, self.extra)

    def setup(self, model: nn.Module) -> None:
        deepspeed = import_deepspeed()
        self._set_local_rank = _set_local_rank(self.ctx.info)  # removed again at teardown
        config = self.ds_config()
        self._check_config(deepspeed, config)
        train = self.ctx.train
        if self.stage == 3 and is_meta(model):
            model = self._build_partitioned(deepspeed, model, config)
        else:
            model = self._on_device(model)
        apply_activation_checkpointing(model, train.activation_checkpointing, train.blocks)
        groups = param_groups(model, train, shape=self.param_shape)  # every strategy's groups, partitioned
        client_optimizer = None if "optimizer" in config else build_optimizer(groups, train, self.ctx.device)
        # Past the config check, a failure is the engine's (a runtime error with DeepSpeed's own traceback).
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=client_optimizer, model_parameters=groups if client_optimizer is None else None,
            config=config, dist_init_required=False)
        if train.compile:  # on the engine's module, in place: DeepSpeed's hooks are installed by now
            apply_compile(self.engine.module, train.compile_options, train.blocks)
        self.model = self.engine

    def _check_config(self, deepspeed: Any, config: Dict[str, Any]) -> None:
        """DeepSpeed's own config parser, run on its own so that only its complaints become a ConfigError."""
        from deepspeed.runtime.config import DeepSpeedConfig  # lazy: start-up: DeepSpeed takes seconds to import

        # What deepspeed.initialize does first: wrap the existing process group (the parser reads its world size).
        deepspeed.comm.init_distributed(dist_init_required=False, verbose=False)
        try:
            DeepSpeedConfig(config)
        except (AssertionError, ValueError) as err:  # its batch asserts, pydantic's ValidationError
            detail = " ".join(str(err).split())
            raise ConfigError(f"DeepSpeed rejected the generated config (strategy.kwargs): {detail}",
                              key="strategy.kwargs") from None

    def _build_partitioned(self, deepspeed: Any, model: nn.Module, config: Dict[str, Any]) -> nn.Module:
        """ZeRO-3 from birth: the model's factory again, inside ``deepspeed.zero.Init``, from the generator state
        the meta build started from (the meta model was built to check the constructors draw what they should)."""
        init = meta_init_of(model)
        torch.set_rng_state(init.rng_state)
        with freed_memory_returned(), deepspeed.zero.Init(config_dict_or_path=config):
            return init.factory()

    # --- the step ----------------------------------------------------------------------------------
    # forward_context stays the base autocast: DeepSpeed's bf16/fp16 modes cast the module's weights, not its
    # inputs, and autocast casts float inputs (images) to match and keeps the loss in fp32.

    def accumulate(self, last_micro_step: bool) -> ContextManager:
        self._last_micro_step = last_micro_step
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, scale: Union[float, torch.Tensor] = 1.0) -> None:
        # The loss is already this micro-batch's share of the step's objective: DeepSpeed must not divide by gas.
        self.engine.backward(self._scaled(loss, scale), scale_wrt_gas=False)
        if not self._last_micro_step:
            self.engine.step()  # DeepSpeed's micro-step: advances its counter, no update

    def clip_grad_norm(self, max_norm: float) -> Optional[torch.Tensor]:
        """DeepSpeed clips inside its step (gradient_clipping in the generated config).

        ZeRO and DeepSpeed's bf16 optimizer measure the norm there: the tensor returned here is filled in by
        ``step``, before anyone reads it. A plain stage-0 fp32 step measures nothing; then None, and the trainer
        asks ``grad_norm`` on the steps it logs, while the reduced gradients are whole in p.grad.
        """
        if not self._engine_measures_norm():
            return None
        self._norm = torch.full((), float("nan"))
        return self._norm

    def grad_norm(self) -> float:
        if not self._engine_measures_norm():
            return super().grad_norm()
        return float(self._norm)  # ZeRO keeps gradients in its own partitions: the norm of its last step

    def _engine_measures_norm(self) -> bool:
        return hasattr(self.engine.optimizer, "_global_grad_norm")

    def step(self) -> None:
        if not self.engine.is_gradient_accumulation_boundary():
            raise RuntimeError("DeepSpeed's micro-step counter is not at an accumulation boundary: every micro-step "
                               "must run inside Strategy.accumulate")
        self.engine.step()
        if self._engine_measures_norm():
            self._norm.fill_(float(self.engine.get_global_grad_norm()))

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:  # the basic optimizer's groups, behind ZeRO's wrapper
            group["lr"] = lr

    # --- an engine's tensors, seen from outside ----------------------------------------------------
    def local_tensor(self, param: torch.Tensor) -> torch.Tensor:
        local = getattr(param, "ds_tensor", None)  # ZeRO-3 keeps the shard apart, the parameter itself empty
        return local if local is not None else param

    def param_shape(self, param: torch.Tensor) -> torch.Size:
        return getattr(param, "ds_shape", param.shape)  # ZeRO-3 keeps the real shape apart

    # --- state -------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full weights on rank 0: the fp32 master values where DeepSpeed keeps a low-precision model copy."""
        deepspeed = import_deepspeed()
        from deepspeed.utils import safe_get_full_fp32_param  # lazy: start-up: DeepSpeed takes seconds to import

        rank0 = torch.distributed.get_rank() == 0
        module = self.module
        params = dict(module.named_parameters())
        full: Dict[str, torch.Tensor] = {}
        # Collective under ZeRO-3 (gathers every shard), so every rank walks the same parameters.
        with deepspeed.zero.GatheredParameters(list(params.values()), enabled=self.stage == 3):
            for name, value in module.state_dict().items():
                master = safe_get_full_fp32_param(params[name]) if name in params else None
                tensor = master if master is not None and self.ctx.train.precision != "fp32" else value
                if rank0:
                    full[name] = tensor.detach().float().cpu().clone() if tensor.is_floating_point() \
                        else tensor.detach().cpu().clone()
        return full

    def memory_report(self) -> Dict[str, int]:
        """Bytes this rank holds: DeepSpeed's partitions for sharded parts, plus its fp32 master copy.

        ``params`` is the module's parameter storage (ZeRO-3: this rank's partition ``ds_tensor``);
        ``grads`` is the gradient storage the update uses (ZeRO-2/3: this rank's partition);
        ``optimizer`` is the optimizer's state (ZeRO-1+: over this rank's partition);
        ``master_params`` is the fp32 copy ZeRO (and bf16 at stage 0) keeps to step on, absent otherwise.
        """
        module_params = list(self.module.parameters())
        if self.stage == 3:
            params = sum(_local_bytes(p.ds_tensor) for p in module_params)
        else:
            params = sum(_local_bytes(p) for p in module_params)
        wrapper = self.engine.optimizer
        basic = getattr(wrapper, "optimizer", wrapper)
        partitions = list(_master_partitions(wrapper))
        # fp32 ZeRO-3 steps on the weights' own flat partition (no copy): only a separate tensor is a master copy.
        weights = {(p.ds_tensor if self.stage == 3 else p).untyped_storage().data_ptr() for p in module_params}
        masters = [m for m in partitions if m.untyped_storage().data_ptr() not in weights]
        element = module_params[0].element_size() if module_params else 4
        if self.stage >= 2:
            grads = sum(p.numel() for p in partitions) * element
        else:
            grads = sum(p.numel() for p in module_params) * element
        report = {
            "params": params,
            "grads": grads,
            "optimizer": sum(_local_bytes(v) for s in basic.state.values() for v in s.values() if torch.is_tensor(v)),
        }
        if masters:
            report["master_params"] = sum(_local_bytes(p) for p in masters)
        return report

    # --- checkpoints: DeepSpeed's own format --------------------------------------------------------
    def checkpoint_state(self) -> Dict[str, Any]:
        raise _not_dcp()

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        raise _not_dcp()

    def save_checkpoint(self, directory: Path, step: int, asynchronous: bool = False,
                        group: Optional[Any] = None) -> None:
        """``engine.save_checkpoint`` into ``directory/engine`` (every rank writes its ZeRO partition), plus the
        consolidated weights in our portable format (``model.safetensors``, for export and inference)."""
        self.engine.save_checkpoint(str(directory / ENGINE_DIR), tag=CHECKPOINT_TAG, save_latest=False)
        weights = self.full_state_dict()  # collective; complete on rank 0
        if self.ctx.info.is_main:
            save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(directory / CONSOLIDATED))

    def load_checkpoint(self, directory: Path) -> None:
        """``engine.load_checkpoint`` from ``directory/engine``, optimizer state included.

        Stage 0 loads at any world size (the optimizer state is saved whole). Stages 1-3 partition the optimizer
        state by data-parallel rank and DeepSpeed loads them only at the world size they were saved at; to change
        it, convert with ``python -m deepspeed.checkpoint.ds_to_universal`` and load with
        ``strategy.kwargs.config.checkpoint.load_universal=true``.
        """
        directory = Path(directory) / ENGINE_DIR
        refuse_pickled_code(Path(directory) / CHECKPOINT_TAG)
        try:
            path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                                  load_lr_scheduler_states=False)
        except Exception as err:  # DeepSpeed raises several types (ZeRORuntimeException, AssertionError, OSError)
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in '{directory}': {err}") from None
        if path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint '{CHECKPOINT_TAG}' in '{directory}'.")

    def teardown(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        if self._set_local_rank:  # a later Trainer in this process must not mistake it for a launcher's
            os.environ.pop("LOCAL_RANK", None)
            self._set_local_rank = False


def _set_local_rank(info: ProcessInfo) -> bool:
    """LOCAL_RANK for a process started without a launcher: DeepSpeed reads it from the environment (at start-up
    and, under ZeRO-3, while partitioning) even when the process group exists. True when this call set it."""
    if "LOCAL_RANK" in os.environ:
        return False
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    return True


def _not_dcp() -> CheckpointError:
    return CheckpointError("strategy.name=deepspeed saves with DeepSpeed's engine (save_checkpoint), not with "
                           "torch.distributed.checkpoint: its flat ZeRO partitions are not DCP state dicts.")


def refuse_pickled_code(directory: Path) -> None:
    """Refuse a DeepSpeed checkpoint whose files would run code when unpickled, before DeepSpeed reads them.

    DeepSpeed loads its files with ``torch.load(weights_only=False)``, which executes whatever a pickle names.
    Every file is read here first with ``weights_only=True``, admitting only the few DeepSpeed value classes its
    checkpoints hold (loss scaler, ZeRO stage, fragment address); anything else raises CheckpointError.
    """
    import_deepspeed()
    # lazy: start-up: DeepSpeed takes seconds to import
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # UnpicklingError for foreign globals; RuntimeError/EOFError for damaged files
            detail = " ".join(str(err).split())[:300]
            raise CheckpointError(f"Refused to load DeepSpeed checkpoint file '{path}': it does not read as plain "
                                  f"tensors and DeepSpeed's own values ({detail}). distrain never unpickles code "
                                  f"from a checkpoint; resume from another one (train.resume=PATH).") from None


def _master_partitions(wrapper: Any) -> List[torch.Tensor]:
    """The fp32 copies DeepSpeed steps on: ZeRO-3, ZeRO-1/2 and the stage-0 bf16 optimizer name them differently
    (ZeRO-3 also swaps them in and out of the basic optimizer's param_groups, so those cannot be read)."""
    for attribute in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        partitions = getattr(wrapper, attribute, None)
        if partitions:
            return [p for p in partitions if torch.is_tensor(p)]
    return []  # a plain stage-0 fp32 step: the module's own parameters are what the optimizer steps


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (DeepSpeed's config parser wants JSON types)."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return copy.deepcopy(dict(value)) if isinstance(value, Mapping) else value


def _merge(base: Dict[str, Any], extra: Mapping[str, Any]) -> Dict[str, Any]:
    """``extra`` merged into ``base`` recursively (extra wins on leaves)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged
