"""A user's model for the tests of sharded-from-birth builds, compile and activation checkpointing: a causal
character LM made only of torch layers (TransformerEncoderLayer, whose attention initialises itself with
_reset_parameters), a causal-mask buffer computed in the constructor, and a head tied to the embedding."""

import torch
from torch import nn

VOCAB = 98  # the `text` dataset's vocabulary


class TinyCausalLM(nn.Module):
    def __init__(self, dim: int = 32, layers: int = 2, block: int = 32, ff: int = 64, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Embedding(block, dim)
        # bias=False: attention's key bias gets an analytically zero gradient (softmax is shift-invariant), whose
        # rounding noise Adam would amplify into real updates, so runs that differ only in summation order (W=1 vs
        # W=3) would drift apart; the built-in gpt leaves it out for the same reason.
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, ff, dropout=0.0, batch_first=True,
                                                               norm_first=True, bias=False) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, VOCAB, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(block), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        h = self.embed(idx) + self.pos(torch.arange(t, device=idx.device))
        for layer in self.layers:
            h = layer(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.out(self.norm(h))


def user_model() -> nn.Module:
    return TinyCausalLM()


def large_user_model() -> nn.Module:
    """About 302M parameters (1.2 GB in fp32): 24 layers of width 1024 with a 4096-wide feed-forward."""
    return TinyCausalLM(dim=1024, layers=24, block=16, ff=4096, heads=16)
