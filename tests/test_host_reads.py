"""In steady state a training step reads no device value on the host: on a GPU every such read (``.item()``,
``float(t)``, ``if t:``, ``.tolist()``, ``.cpu()``) waits for the stream, i.e. a host-device sync per step.

On the CPU there is no stream to wait for, so the reads are counted instead: a TorchFunctionMode sees every
tensor method call; a read made by distrain's own code (the calling frame is in distrain/) in a step after the
warm-up that is not a log step counts. Reads inside torch (the optimizer's CPU step counters) are torch's; the
GPU test at the end runs real steps under ``torch.cuda.set_sync_debug_mode("error")``, which sees those too.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from torch.overrides import TorchFunctionMode

import distrain
from distrain.training.losses import sequence_cross_entropy

DISTRAIN = str(Path(distrain.__file__).parent)
READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}
# Tensors that live on the host on every machine, whose reads are no sync: the sampler's seeded permutation of the
# dataset (torch.randperm on a CPU generator) that each step's indices are sliced from.
HOST_TENSORS = ("data/sampler.py",)
STEPS, LOG_EVERY, WARMUP = 8, 4, 2
COMMON = ["train.steps=8", f"train.log_every={LOG_EVERY}", "train.eval_every=0", "checkpoint.at_end=false",
          "metrics.progress=none", "run.name=reads", "train.warmup_steps=0"]
GPT = ["train.global_batch=8", "train.micro_batch=4", "data.kwargs.max_chars=20000", "data.kwargs.block_size=32",
       "data.eval_fraction=0.01", "model.kwargs={embed: 32, heads: 4, layers: 1}"]
pytestmark = pytest.mark.usefixtures("one_thread")


class HostReads(TorchFunctionMode):
    """Counts host reads of tensor values made by distrain's code, per loop iteration (``iteration``: the step
    index whose train_step ran last; the loop's tail after it, logging and checkpoints, belongs to it too)."""

    def __init__(self) -> None:
        super().__init__()
        self.iteration = -1
        self.reads: Dict[int, List[str]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(DISTRAIN):
                module = Path(caller.f_code.co_filename).relative_to(DISTRAIN).as_posix()
                if module not in HOST_TENSORS:
                    self.reads[self.iteration].append(f"{module}:{caller.f_lineno} {func.__name__}")
        return func(*args, **(kwargs or {}))


def steady_state_reads(tmp_path, config: str, overrides: List[str], **kwargs) -> Dict[int, List[str]]:
    """Host reads per steady-state loop iteration (after WARMUP steps, log steps and the last one left out)."""
    from distrain.training.trainer import Trainer

    counter = HostReads()
    with Trainer(config, overrides=[*COMMON, f"run.dir={tmp_path}", *overrides], **kwargs) as trainer:
        train_step = trainer.train_step

        def counted_step(step: int) -> torch.Tensor:
            counter.iteration = step
            return train_step(step)

        trainer.train_step = counted_step
        with counter:
            trainer.fit()
    steady = [s for s in range(WARMUP, STEPS) if (s + 1) % LOG_EVERY and s + 1 != STEPS]
    assert steady, "no steady-state step to count"
    return {s: counter.reads.get(s, []) for s in steady}


def test_a_steady_state_step_reads_nothing_on_the_host(tmp_path):
    # gpt: a summing loss over every token (no collective, no count read); mlp: a mean over samples (static)
    assert steady_state_reads(tmp_path / "gpt", "configs/gpt.yaml", GPT) == {2: [], 4: [], 5: [], 6: []}
    assert steady_state_reads(tmp_path / "mlp", "configs/mlp.yaml", []) == {2: [], 4: [], 5: [], 6: []}


def test_a_mean_loss_over_counted_labels_reads_nothing_on_the_host(tmp_path):
    """A loss without num_items_in_batch over labels counted on the device: the empty-micro-batch check (0/0)
    waits for the next log step instead of reading the counts every step (distrain.training.empty_items)."""
    mean_ce = lambda outputs, target: sequence_cross_entropy(outputs, target)  # noqa: E731 (a mean: no count)
    reads = steady_state_reads(tmp_path, "configs/gpt.yaml", GPT, loss_fn=mean_ce)
    assert reads == {2: [], 4: [], 5: [], 6: []}


@pytest.mark.gpu
def test_steady_state_steps_make_no_host_device_sync_on_a_gpu(tmp_path):
    """Real CUDA steps under set_sync_debug_mode("error"): any synchronising call in a steady-state step raises."""
    from conftest import child_env
    import subprocess

    script = f"""
import torch
from distrain.training.trainer import Trainer
from distrain.training.losses import sequence_cross_entropy
for name, kwargs in (("sums", {{}}), ("mean", {{"loss_fn": lambda o, t: sequence_cross_entropy(o, t)}})):
    with Trainer("configs/gpt.yaml", overrides={[*COMMON, *GPT, "train.optimizer_impl=fused", "train.log_every=100"]!r}
                 + ["run.dir={tmp_path}/" + name], **kwargs) as trainer:
        for step in range({WARMUP}):
            trainer.train_step(step)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        for step in range({WARMUP}, {STEPS - 1}):
            trainer.train_step(step)  # not a log step (train.log_every=100): no timer sync, no record
        torch.cuda.set_sync_debug_mode(0)
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=child_env(gpu=True), cwd=Path(distrain.__file__).parents[1])
    assert proc.returncode == 0 and "ok" in proc.stdout, (proc.stdout + proc.stderr)[-4000:]
