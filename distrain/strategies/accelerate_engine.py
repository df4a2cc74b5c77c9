"""Hugging Face Accelerate: ``accelerate.Accelerator`` drives the same model, optimizer and accumulation.

``Accelerator(gradient_accumulation_steps=grad_accum)`` and ``accelerator.prepare(model, optimizer)`` do the
wrapping (DDP under torchrun; MULTI_CPU on gloo without GPUs), ``accelerator.accumulate(model)`` skips the
gradient all-reduce on all but the last micro-step, ``accelerator.backward`` divides the loss by the accumulation
steps (and scales it for fp16), the prepared optimizer only steps on the sync micro-step, and
``mixed_precision`` comes from ``train.precision``.

Exactness: DDP would divide the summed gradients by W after Accelerate divided each loss by grad_accum: two
roundings of the 1/(grad_accum x W) factor, which do not match one rank's single one. The DDP model Accelerate
builds gets distrain's SUM all-reduce hook instead, and the loss reaching ``accelerator.backward`` is each
micro-batch's share of the step's objective times grad_accum (``loss_factor``), which Accelerate divides back
out; the ranks' contributions are added, as with the ddp strategy.
"""

from __future__ import annotations

from typing import Any, ContextManager, Dict, List, Optional, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distrain.strategies.placement import Layout
from distrain.strategies.base import Strategy, StrategyContext
from distrain.config import BatchPlan
from distrain.strategies.comm_hooks import BucketCapMB, ByteCounter, register_comm_hook
from distrain.strategies.ddp import refuse_auto_with
from distrain.strategies.ddp_join import BackwardJoin, JoinsDDPBackward

MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


class AccelerateStrategy(JoinsDDPBackward, Strategy):
    """Hugging Face Accelerate's Accelerator (DDP underneath) prepares the model and optimizer and runs backward."""

    name = "accelerate"
    meta_init = True
    supports_auto_micro_batch = True

    @classmethod
    def layouts(cls) -> List[Layout]:
        return [Layout("accelerate", cls.name, speed_rank=1)]

    def __init__(self, ctx: StrategyContext, bucket_cap_mb: BucketCapMB = 25.0, find_unused_parameters: bool = False):
        super().__init__(ctx)
        self.ddp_kwargs = dict(bucket_cap_mb=bucket_cap_mb, find_unused_parameters=find_unused_parameters)
        self.grad_scaler = None  # Accelerate keeps its own GradScaler for fp16
        self.accelerator: Any = None
        self._sent = ByteCounter()
        self._join: Optional[BackwardJoin] = None  # micro_batch=auto at W > 1 (distrain.strategies.ddp_join)
        refuse_auto_with(ctx.plan, **{"find_unused_parameters=true": find_unused_parameters})

    def setup(self, model: nn.Module) -> None:
        from accelerate import Accelerator  # lazy: start-up: Accelerate takes seconds to import
        from accelerate.utils import DistributedDataParallelKwargs

        self.accelerator = Accelerator(gradient_accumulation_steps=self.ctx.plan.grad_accum,
                                       mixed_precision=MIXED_PRECISION[self.ctx.train.precision],
                                       cpu=self.ctx.device.type == "cpu",
                                       kwargs_handlers=[DistributedDataParallelKwargs(**self.ddp_kwargs)])
        model = self._on_device(model, self.accelerator.device)
        self._checkpoint_and_compile(model)  # per block and in place, before Accelerate's DDP (as in DDPStrategy)
        optimizer = self._build_optimizer(model)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if isinstance(self.model, DistributedDataParallel):  # one process: Accelerate leaves the model unwrapped
            register_comm_hook(self.model, None, counter=self._sent)  # SUM, counted (see the module docstring)
            if self.ctx.plan.auto:
                self._join = BackwardJoin(self.model, self._sent)

    @property
    def comm_bytes(self) -> int:
        """Gradient bytes this rank has all-reduced so far."""
        return self._sent.total

    # --- the step ----------------------------------------------------------------------------------
    def forward_context(self) -> ContextManager:
        return self.accelerator.autocast()  # a no-op for fp32; the prepared model also casts outputs to fp32

    def accumulate(self, last_micro_step: bool) -> ContextManager:
        if self._join is not None:
            self._join.arm()
        context = self.accelerator.accumulate(self.model)
        return _CheckedAccumulate(context, self.accelerator, last_micro_step)

    def loss_factor(self) -> int:
        return self.ctx.plan.grad_accum  # ``accelerator.backward`` divides by it; the ranks' gradients are summed

    def backward(self, loss: torch.Tensor, scale: Union[float, torch.Tensor] = 1.0) -> None:
        self.accelerator.backward(self._scaled(loss, scale))  # Accelerate then divides by grad_accum

    def clip_grad_norm(self, max_norm: float) -> Optional[torch.Tensor]:
        if max_norm <= 0:
            return None
        return self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)  # unscales fp16 first

    def grad_norm(self) -> float:
        norm = super().grad_norm()
        scaler = self.accelerator.scaler  # fp16: Accelerate's own GradScaler, not self.grad_scaler
        return norm / scaler.get_scale() if scaler is not None else norm

    def drop_step(self) -> None:
        self.optimizer.optimizer.zero_grad(set_to_none=True)  # Accelerate's wrapper only clears on a sync micro-step
        self.accelerator.step = 0  # its micro-step counter restarts with the step (a failed rank stopped early)
        if self._join is not None:
            self._join.reset()

    def use_plan(self, plan: BatchPlan) -> None:
        super().use_plan(plan)  # loss_factor follows: Accelerate divides each backward by the new accumulation
        self.accelerator.gradient_accumulation_steps = plan.grad_accum

    def step(self) -> None:
        self.optimizer.step()  # the prepared optimizer: steps only on the sync micro-step, through the scaler
        self.optimizer.zero_grad(set_to_none=True)

    # --- state -------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def checkpoint_state(self) -> Dict[str, Any]:
        # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
        from torch.distributed.checkpoint.state_dict import get_state_dict

        # The plain torch optimizer inside Accelerate's wrapper is what torch's state_dict helpers understand.
        model_state, optim_state = get_state_dict(self.model, self.optimizer.optimizer)
        return {"model": model_state, "optim": optim_state, **self._accelerate_scaler_state()}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        if self.accelerator.scaler is not None and state.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])

    def _accelerate_scaler_state(self) -> Dict[str, Any]:
        scaler = self.accelerator.scaler
        return {"grad_scaler": scaler.state_dict()} if scaler is not None else {}

    def state_tensors(self) -> Dict[str, Any]:
        tensors = dict(super().state_tensors())
        inner = self.optimizer.optimizer
        tensors["optimizer"] = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
        return tensors

    def teardown(self) -> None:
        if self._join is not None:
            self._join.close()
        if self.accelerator is not None:
            # lazy: start-up: Accelerate takes seconds to import
            from accelerate.state import AcceleratorState, GradientState

            self.accelerator.free_memory()
            # Accelerate keeps its settings in process-wide singletons that refuse a second Accelerator with other
            # settings (e.g. another precision); a closed Trainer releases them so the next one in this process
            # can start fresh. The process group (PartialState) stays: it belongs to whoever created it.
            AcceleratorState._reset_state(reset_partial_state=False)
            GradientState._reset_state()
            self.accelerator = None


class _CheckedAccumulate:
    """``accelerator.accumulate`` that fails loudly if Accelerate's micro-step count and ours ever disagree."""

    def __init__(self, inner: ContextManager, accelerator: Any, last_micro_step: bool):
        self.inner, self.accelerator, self.last = inner, accelerator, last_micro_step

    def __enter__(self) -> None:
        self.inner.__enter__()
        if self.accelerator.sync_gradients != self.last:
            drifted = RuntimeError(f"Accelerate's gradient sync ({self.accelerator.sync_gradients}) disagrees with "
                                   f"the trainer's last micro-step ({self.last}): its micro-step counter drifted")
            self.inner.__exit__(type(drifted), drifted, None)  # a context that was entered is always left
            raise drifted

    def __exit__(self, *exc: Any) -> Optional[bool]:
        return self.inner.__exit__(*exc)
