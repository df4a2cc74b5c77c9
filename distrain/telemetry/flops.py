"""Model FLOPs per sample and peak FLOP/s per device: the two numbers behind achieved FLOP/s and MFU.

MFU (model FLOPs utilisation, PaLM appendix B) = model FLOPs per sample x samples/s per device / peak FLOP/s.
"Model FLOPs" are the forward + backward matmul/conv work the model needs (6 per parameter-multiply per
sample for dense layers), not what the hardware happened to execute (recomputation, padding do not count).
"""

from __future__ import annotations

import re
import contextlib
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from distrain.models import MODEL_FLOPS

# Dense (no sparsity) peak FLOP/s per device from the vendors' datasheets, by training precision. fp32 means
# plain FP32 (PyTorch does not use TF32 for matmuls unless asked). First match on the device name wins, so
# the more specific names come first.
PEAK_FLOPS: Tuple[Tuple[str, dict], ...] = (
    (r"H100.*PCIe", {"fp32": 51.2e12, "bf16": 756e12, "fp16": 756e12}),
    (r"H100.*NVL", {"fp32": 60e12, "bf16": 835e12, "fp16": 835e12}),
    (r"H100|H200|GH200", {"fp32": 66.9e12, "bf16": 989.4e12, "fp16": 989.4e12}),
    (r"B200", {"fp32": 80e12, "bf16": 2250e12, "fp16": 2250e12}),
    (r"A100", {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12}),
    (r"A10G", {"fp32": 31.2e12, "bf16": 70e12, "fp16": 70e12}),
    (r"L40S", {"fp32": 91.6e12, "bf16": 362e12, "fp16": 362e12}),
    (r"\bL4\b", {"fp32": 30.3e12, "bf16": 121e12, "fp16": 121e12}),
    (r"\bA10\b", {"fp32": 31.2e12, "bf16": 125e12, "fp16": 125e12}),
    (r"V100", {"fp32": 15.7e12, "fp16": 125e12}),
    (r"\bT4\b", {"fp32": 8.1e12, "fp16": 65e12}),
)


@dataclass(frozen=True)
class FlopsEstimate:
    """Training FLOPs per sample, or None with the reason it is unknown."""

    per_sample: Optional[float]
    method: str  # how it was obtained, or why it is missing


@dataclass(frozen=True)
class PeakFlops:
    """Peak FLOP/s of one device, or None with the reason it is unknown."""

    value: Optional[float]
    source: str


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def peak_flops(device: torch.device, precision: str, configured: float = 0.0) -> PeakFlops:
    """metrics.peak_flops when set, else the datasheet table for this device and precision."""
    if configured > 0:
        return PeakFlops(configured, "metrics.peak_flops")
    name = device_name(device)
    value = lookup_peak(name, precision) if device.type == "cuda" else None
    if value is not None:
        return PeakFlops(value, f"datasheet table ({name}, {precision})")
    return PeakFlops(None, f"no peak FLOP/s known for {name!r} at {precision}; set metrics.peak_flops to get MFU")


def lookup_peak(name: str, precision: str) -> Optional[float]:
    """The datasheet peak FLOP/s of a CUDA device by its name (torch.cuda.get_device_name), or None."""
    for pattern, by_precision in PEAK_FLOPS:
        if re.search(pattern, name):
            return by_precision.get(precision)
    return None


def flops_per_sample(model: nn.Module, spec: Any, builtin: Optional[str] = None,
                     sample: Any = None) -> FlopsEstimate:
    """Training FLOPs per sample: a built-in's formula, a model's own ``flops_per_sample()``, or torch's counter.

    ``builtin`` is the model.name of a built-in model; ``sample`` is one input batch of size 1 (or a Mapping of
    the forward's keyword arguments) for counting a
    user's model with torch.utils.flop_counter (forward only, x3 for backward; ops the counter does not know,
    such as fused RNN kernels on CPU, are not counted). Nothing is computed: the forward runs on shapes only
    (meta tensors for a meta-built model, fake tensors for a built one), so counting costs no memory and no
    time, whatever the model's size.
    """
    if builtin is not None and builtin in MODEL_FLOPS and spec is not None:
        return FlopsEstimate(float(MODEL_FLOPS[builtin](model, spec)), f"formula for built-in model {builtin!r}")
    own = getattr(model, "flops_per_sample", None)
    if callable(own):
        return FlopsEstimate(float(own()), "the model's flops_per_sample()")
    if sample is None:
        return FlopsEstimate(None, "no sample to count FLOPs on")
    return _count(model, sample)


def _count(model: nn.Module, sample: Any) -> FlopsEstimate:
    was_training = model.training
    model.eval()  # no dropout, no BatchNorm statistics update
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _shapes_only(model, sample) as shaped, \
                FlopCounterMode(display=False) as counter:
            model(**shaped) if isinstance(shaped, Mapping) else model(shaped)  # keyword arguments: HF style
    except Exception as err:  # an estimate is optional: a model the counter cannot trace still trains
        return FlopsEstimate(None, f"torch's FLOP counter failed on the model ({type(err).__name__}: {err})")
    finally:
        model.train(was_training)
    forward = counter.get_total_flops()
    if not forward:
        return FlopsEstimate(None, "torch's FLOP counter saw no matmul or convolution in the model's forward")
    return FlopsEstimate(3.0 * forward, "torch.utils.flop_counter on one sample (forward x 3)")


@contextlib.contextmanager
def _shapes_only(model: nn.Module, sample: Any) -> Iterator[Any]:
    """A forward that computes no values. A model whose parameters are on the meta device (built for sharding)
    runs on a meta sample, its real buffers swapped for meta ones meanwhile; any other model runs under a
    FakeTensorMode, which turns its real tensors into fakes as ops meet them."""
    if any(p.is_meta for p in model.parameters()):
        buffers = [(m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None]
        for m, name, b in buffers:
            m._buffers[name] = b.to("meta")
        try:
            yield _each_tensor(sample, lambda t: t.to("meta"))
        finally:
            for m, name, b in buffers:
                m._buffers[name] = b
        return
    # lazy: optional: a private torch API, looked up where used
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        yield _each_tensor(sample, mode.from_tensor)


def _each_tensor(sample: Any, convert: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """A tensor sample converted, or a Mapping one (Hugging Face style keyword arguments) converted per value."""
    if isinstance(sample, Mapping):
        return {k: convert(v) if isinstance(v, torch.Tensor) else v for k, v in sample.items()}
    return convert(sample)
