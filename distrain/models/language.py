"""Character-level language models: an LSTM and a small decoder-only transformer (GPT)."""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import nn

from distrain.data.datasets import DataSpec
from distrain.config.options import Range
from distrain.models.registry import Size, register_flops, register_model


def _require_lm(spec: DataSpec, name: str) -> None:
    if spec.task != "lm":
        raise ValueError(f"{name} is a language model and needs token data, e.g. data.name=text")


class CharLSTM(nn.Module):
    def __init__(self, vocab_size: int, embed: int, hidden: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed)
        self.lstm = nn.LSTM(embed, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(idx))
        return self.head(out)


@register_model("lstm")
def lstm(spec: DataSpec, embed: Size = 64, hidden: Size = 128, layers: Size = 1) -> nn.Module:
    _require_lm(spec, "lstm")
    return CharLSTM(spec.num_classes, embed, hidden, layers)


class GPTLinear(nn.Linear):
    """nn.Linear with GPT-2's init, N(0, std) weights and zero bias, done by its own reset_parameters().

    Each layer initialising itself in its constructor (rather than the model re-initialising everything at the
    end of GPT.__init__, as nanoGPT does) is what lets the model be built on the meta device and replayed shard
    by shard into exactly these values (distrain.models.meta_init).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02):
        self.std = std  # read by reset_parameters(), which nn.Linear's constructor calls
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class GPTEmbedding(nn.Embedding):
    """nn.Embedding with GPT-2's N(0, 0.02) init (torch's default is N(0, 1))."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=0.02)


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, residual_std: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embed={dim} must be divisible by heads={heads}")
        self.heads = heads
        # No bias: a key bias gets an analytically zero gradient (softmax is shift-invariant), and Adam would
        # amplify its rounding noise into real updates, so runs that differ only in summation order drift apart.
        self.qkv = GPTLinear(dim, 3 * dim, bias=False)
        self.proj = GPTLinear(dim, dim, std=residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: the unit FSDP shards, torch.compile compiles and activation checkpointing
    recomputes, one at a time."""

    def __init__(self, dim: int, heads: int, residual_std: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, residual_std)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(GPTLinear(dim, 4 * dim), nn.GELU(), GPTLinear(4 * dim, dim, std=residual_std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, embed: int, heads: int, layers: int):
        super().__init__()
        self.block_size = block_size
        residual_std = 0.02 / math.sqrt(2 * layers)  # GPT-2's scaled init of the residual projections
        self.tok = GPTEmbedding(vocab_size, embed)
        self.pos = GPTEmbedding(block_size, embed)
        self.blocks = nn.ModuleList(Block(embed, heads, residual_std) for _ in range(layers))
        self.ln_f = nn.LayerNorm(embed)
        self.head = GPTLinear(embed, vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence length {t} exceeds the model's block_size {self.block_size}")
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


@register_model("gpt")
def gpt(spec: DataSpec, embed: Size = 64, heads: Size = 4, layers: Size = 2,
        block_size: Annotated[int, Range(ge=0, note="0: the dataset's window")] = 0) -> nn.Module:
    """A nanoGPT-style decoder; block_size defaults to the dataset's window."""
    _require_lm(spec, "gpt")
    return GPT(spec.num_classes, block_size or spec.extra.get("block_size", 64), embed, heads, layers)


def flops_per_token(model: nn.Module) -> float:
    """Training FLOPs per token (forward + backward), the 6N + attention estimate of the PaLM paper."""
    n = sum(p.numel() for p in model.parameters())
    if isinstance(model, GPT):
        n -= model.pos.weight.numel()
        attn = 12 * len(model.blocks) * model.tok.embedding_dim * model.block_size
        return 6 * n + attn
    return 6 * n


@register_flops("gpt")
def gpt_flops(model: nn.Module, spec: DataSpec) -> float:
    """Training FLOPs per sample: flops_per_token x the sample's sequence length."""
    return flops_per_token(model) * spec.input_shape[0]


@register_flops("lstm")
def lstm_flops(model: nn.Module, spec: DataSpec) -> float:
    """Training FLOPs per sample: the four gates' input and recurrent matmuls per layer, and the output head,
    at 6 FLOPs per multiply-add (forward 2, backward 4), times the sequence length."""
    lstm = model.lstm
    per_token = 0.0
    for layer in range(lstm.num_layers):
        width = lstm.input_size if layer == 0 else lstm.hidden_size
        per_token += 6 * 4 * lstm.hidden_size * (width + lstm.hidden_size)
    per_token += 6 * model.head.in_features * model.head.out_features
    return per_token * spec.input_shape[0]
