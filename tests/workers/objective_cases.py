"""Models, data and steps shared by tests/test_objective.py and its torchrun worker (tests/workers/objective_worker.py).

A tiny transformers GPT-2 (random init, built locally: no hub), padded variable-length dict samples whose padding
labels are -100, a frozen-teacher distillation step, and the plain full-batch reference loops the distributed runs
must reproduce.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

VOCAB, LENGTH = 64, 16
HF_COMMON = ["train.global_batch=12", "train.micro_batch=2", "train.steps=10", "train.optimizer=sgd", "train.lr=0.5",
             "train.warmup_steps=0", "train.lr_schedule=constant", "train.grad_clip=0", "train.weight_decay=0",
             "train.eval_every=0", "train.log_every=5", "data.eval_fraction=0"]
# The built-in gpt on padded text: windows of 32 characters, each cut to a seeded length in [4, 32].
GPT_PADDED = ["model.name=gpt", "model.kwargs={embed: 32, heads: 2, layers: 2}", "data.name=text",
              "data.kwargs={block_size: 32, max_chars: 20000, min_length: 4}"]


class PaddedTokens(Dataset):
    """Variable-length token sequences padded to LENGTH: {input_ids, attention_mask, labels (-100 on padding)}."""

    def __init__(self, n: int = 48, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)
        self.lengths = torch.randint(2, LENGTH + 1, (n,), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        mask = (torch.arange(LENGTH) < self.lengths[i]).long()
        ids = self.ids[i] * mask
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def gpt2(layers: int = 2, embed: int = 32, seed: int = 0) -> nn.Module:
    """A tiny GPT-2 with random init and no dropout (every rank and the reference draw the same weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    quiet_transformers()
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=embed, n_layer=layers, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def distill_step(model: nn.Module, batch: dict, teacher, num_items_in_batch, temperature: float = 2.0,
                 alpha: float = 0.5):
    """Hard cross-entropy on the labels plus soft targets from a frozen teacher, both summed over valid tokens."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = outputs.logits[:, :-1], batch["labels"][:, 1:]
    valid = labels != -100
    hard = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    soft = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits[:, :-1] / temperature, -1),
                    log_target=True, reduction="none").sum(-1)
    soft = (soft * valid).sum() * temperature ** 2
    return {"loss": ((1 - alpha) * hard + alpha * soft) / num_items_in_batch, "logits": outputs.logits}


def shifted_ce(outputs, batch) -> tuple:
    """An eval metric hook: the student's own token cross-entropy (sum, count), for any step_fn."""
    logits, labels = outputs["logits"][:, :-1], batch["labels"][:, 1:]
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return total, (labels != -100).sum()


def full_batch_reference(model: nn.Module, data: Dataset, steps: int, global_batch: int, lr: float, loss_of,
                         seed: int = 0) -> Dict[str, torch.Tensor]:
    """Plain SGD on each step's whole global batch in one forward: the objective every distributed run must hit."""
    from distrain.data import GlobalStepSampler, fetch_batch

    sampler = GlobalStepSampler(len(data), global_batch, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        loss = loss_of(model, fetch_batch(data, sampler.step_indices(step)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hf_own_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss  # the model's own mean over valid (shifted) labels of the whole batch


def padded_lm_loss(model: nn.Module, batch: tuple) -> torch.Tensor:
    inputs, targets = batch
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten(), ignore_index=-100)


def parameter_ids(module: nn.Module) -> List[int]:
    return [id(p) for p in module.parameters()]


# --- a user's own model and loss for `distrain verify --trainer-args` ------------------------------------------
class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(tokens)))


class PaddedPairs(Dataset):
    """(tokens, next tokens) pairs of seeded lengths 2..LENGTH, padded with target -100."""

    def __init__(self, n: int = 48):
        self.inner = PaddedTokens(n)

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        sample = self.inner[i]
        return sample["input_ids"], torch.cat([sample["labels"][1:], torch.tensor([-100])])


def summed_token_loss(logits, targets, num_items_in_batch):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / num_items_in_batch


def user_lm_args() -> dict:
    """A user's model and summing token loss on padded data: exact at any micro_batch and world size."""
    return {"model": Bigram(), "train_data": PaddedPairs(), "loss_fn": summed_token_loss}


def user_lm_per_sample_args() -> dict:
    """The same data with a per-micro-batch token mean declared as a per-sample loss: what verify must catch."""
    return {"model": Bigram(), "train_data": PaddedPairs(), "items": "samples",
            "loss_fn": lambda logits, targets: F.cross_entropy(logits.flatten(0, 1), targets.flatten())}
