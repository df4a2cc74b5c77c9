"""The GPT-2 124M workload of the gpu suite, and the hand-written loops distrain races on it.

The model is nanoGPT's shape (vocabulary 50304, 12 layers x 768, block 1024, head tied to the token embedding)
written with torch layers, so it initialises itself the way distrain's meta-device build replays (the distrain
contestants receive it as a user's factory, like any user model). ``tiny`` is the same code at a CPU-sized
shape, for checking the suite on a machine without a GPU. The training step is the same everywhere: bf16
autocast, cross-entropy, AdamW (betas 0.9/0.95, weight decay 0.1 on the same parameter groups as distrain's),
gradient clipping at 1.0, a constant learning rate of 6e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from distrain.data import GlobalStepSampler, fetch_batch


@dataclass(frozen=True)
class Shape:
    vocab: int
    layers: int
    heads: int
    embed: int
    block: int
    micro: int  # sequences per step

    def params(self) -> int:
        """Parameters, counting the tied head once."""
        c = self.embed
        per_block = 12 * c * c + 13 * c  # qkv, proj, fc, out weights and biases, two LayerNorms
        return self.vocab * c + self.block * c + self.layers * per_block + 2 * c

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 x (parameters without the position embedding) + attention (PaLM, nanoGPT)."""
        return 6 * (self.params() - self.block * self.embed) + 12 * self.layers * self.embed * self.block


SHAPES = {"gpt2-124m": Shape(vocab=50304, layers=12, heads=12, embed=768, block=1024, micro=16),
          "tiny": Shape(vocab=512, layers=2, heads=4, embed=64, block=64, micro=4)}
HYPER = {"lr": 6e-4, "betas": [0.9, 0.95], "weight_decay": 0.1, "grad_clip": 1.0}


class Block(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.heads = s.heads
        self.ln1, self.ln2 = nn.LayerNorm(s.embed), nn.LayerNorm(s.embed)
        self.qkv, self.proj = nn.Linear(s.embed, 3 * s.embed), nn.Linear(s.embed, s.embed)
        self.fc, self.out = nn.Linear(s.embed, 4 * s.embed), nn.Linear(4 * s.embed, s.embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, 2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT2(nn.Module):
    def __init__(self, s: Shape):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(s.vocab, s.embed), nn.Embedding(s.block, s.embed)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.layers))
        self.ln = nn.LayerNorm(s.embed)
        self.head = nn.Linear(s.embed, s.vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


class RandomTokens(Dataset):
    """Seeded random token windows: (input, next tokens). The step time does not depend on what the tokens say."""

    def __init__(self, s: Shape, n: int, seed: int = 1):
        self.data = torch.randint(0, s.vocab, (n, s.block + 1), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i, :-1], self.data[i, 1:]


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


class HandWritten:
    """The loop a user writes by hand (nanoGPT's train.py without DDP), with the compile and optimizer settings
    of one contestant: ``compile`` none | model (nanoGPT: torch.compile of the whole model) | blocks (in place,
    per block: what train.compile does); ``fused`` AdamW or torch's default implementation."""

    def __init__(self, s: Shape, data: RandomTokens, device: torch.device, compile: str, fused: bool, seed: int = 0):
        from omegaconf import OmegaConf

        from distrain.optim import param_groups

        torch.manual_seed(seed)
        self.model = GPT2(s).to(device)
        self.forward: Callable[..., torch.Tensor] = self.model
        if compile == "model":
            self.forward = torch.compile(self.model)
        elif compile == "blocks":
            for block in self.model.blocks:
                block.compile()
        train = OmegaConf.create({"weight_decay": HYPER["weight_decay"],
                                  "decay_exclude": ["bias", "norm", "embedding"]})  # distrain's default groups
        self.optimizer = torch.optim.AdamW(param_groups(self.model, train), lr=HYPER["lr"], betas=HYPER["betas"],
                                           weight_decay=HYPER["weight_decay"], fused=True if fused else None)
        self.data, self.device, self.micro = data, device, s.micro
        self.sampler = GlobalStepSampler(len(data), s.micro, seed=seed)

    def step(self, step: int) -> None:
        (indices,) = self.sampler.micro_batches(step, 0, 1, self.micro)
        x, y = (t.to(self.device, non_blocking=True) for t in fetch_batch(self.data, indices))
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = loss_fn(self.forward(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), HYPER["grad_clip"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        """Parameters and optimizer state it keeps between steps."""
        tensors: List[torch.Tensor] = list(self.model.parameters())
        tensors += [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def close(self) -> None:
        pass


class WithDistrain:
    """distrain.Trainer on the same model (passed as a factory: built on the meta device) and data; one step is
    ``Trainer.train_step`` (the loop body)."""

    def __init__(self, s: Shape, data: RandomTokens, scratch: str, name: str, train: Dict[str, Any], seed: int = 0):
        from distrain.training.trainer import Trainer

        config = {"run": {"name": name, "dir": scratch, "seed": seed},
                  "train": {"global_batch": s.micro, "micro_batch": s.micro, "steps": 10**6, "optimizer": "adamw",
                            "lr": HYPER["lr"], "betas": HYPER["betas"], "weight_decay": HYPER["weight_decay"],
                            "grad_clip": HYPER["grad_clip"], "precision": "bf16", "resume": "never",
                            "log_every": 10**6, **train},
                  "strategy": {"name": "ddp"}, "checkpoint": {"at_end": False}, "metrics": {"progress": "none"}}
        self.trainer = Trainer(config, model=lambda: GPT2(s), train_data=data, loss_fn=loss_fn)

    def step(self, step: int) -> None:
        self.trainer.train_step(step)

    def state_bytes(self) -> int:
        report = self.trainer.memory_report()
        return report["params"] + report["optimizer"]

    def close(self) -> None:
        self.trainer.close()
