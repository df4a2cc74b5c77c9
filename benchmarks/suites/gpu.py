"""Suite 6, one GPU: the GPT-2 124M shape, distrain against a hand-written loop and nanoGPT's recipe.

``python -m benchmarks gpu`` (on a CUDA machine; ``--device cuda`` to insist). One process on one GPU holds
every contestant, and they take turns step by step in shuffled rounds (benchmarks.rounds), so they share the
GPU's clocks and temperature:

* hand-written eager: the loop a user writes, AdamW in torch's default implementation;
* hand-written compile + fused: nanoGPT's recipe, ``torch.compile(model)`` and fused AdamW;
* hand-written per-block compile + fused: the settings distrain's ``train.compile=true`` uses, by hand;
* distrain defaults: ``Trainer`` with the model as a factory (built on the meta device), bf16, fused AdamW
  (``optimizer_impl: auto`` on CUDA), no compile;
* distrain compile: the same with ``train.compile: true`` (per block) - distrain's recommended GPU settings;
* distrain compile + activation checkpointing: ``train.activation_checkpointing: full``, memory for time.

Reported per contestant: median step time, tokens/s, MFU (training FLOPs 6N + 12·L·C·T per token against the
device's bf16 dense peak, 989.4 TFLOP/s for H100/H200) and the peak of ``torch.cuda.max_memory_allocated``
during one of its steps (plus its resident parameters and optimizer state), against the ZeRO paper's model-state
formula at one rank, 16Ψ (fp32 weights 4, gradients 4, Adam moments 8 bytes per parameter; autocast keeps them
fp32). Targets: distrain compile >= 1.00x the tokens/s of nanoGPT's recipe; distrain compile's step <= 1.02x the
same settings by hand; MFU >= 40%.

Without CUDA the suite runs the same contestants at a tiny shape on the CPU (``tiny``), to check that it works;
those numbers say nothing about a GPU, and no target is checked.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from benchmarks import stats
from benchmarks.jobs import run_job
from benchmarks.options import Check, Options, Section, check
from benchmarks.rounds import interleaved_rounds, settle
from distrain.env import ProcessInfo
from distrain.telemetry.units import format_bytes

NAME = "gpu"
TITLE = "6. One GPU: GPT-2 124M against nanoGPT's recipe"
CONTESTANTS = {  # label -> how it is built
    "hand-written eager": {"kind": "hand", "compile": "none", "fused": False},
    "hand-written compile + fused (nanoGPT)": {"kind": "hand", "compile": "model", "fused": True},
    "hand-written per-block compile + fused": {"kind": "hand", "compile": "blocks", "fused": True},
    "distrain defaults": {"kind": "distrain", "train": {}},
    "distrain compile": {"kind": "distrain", "train": {"compile": True}},
    "distrain compile + activation checkpointing": {"kind": "distrain",
                                                    "train": {"compile": True, "activation_checkpointing": "full"}},
}
NANOGPT, OURS, SAME_BY_HAND = ("hand-written compile + fused (nanoGPT)", "distrain compile",
                               "hand-written per-block compile + fused")
TARGETS = {"tokens_vs_nanogpt": 1.00, "overhead": 1.02, "mfu": 0.40}


def run(opts: Options) -> Dict[str, Any]:
    """One single-process job: the GPT-2 124M shape on CUDA, the tiny shape on a CPU."""
    shape = "gpt2-124m" if opts.device == "cuda" else "tiny"
    rounds = opts.timed_rounds(full=40 if shape != "tiny" else 10, smoke=3)
    params = opts.job_params(shape=shape, rounds=rounds, warmup=opts.pick(full=3, smoke=2))
    return run_job(NAME, params, 1, opts.threads_per_rank, max(opts.timeout_s, 1800))


def worker(params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    from benchmarks.gpt2 import SHAPES, HandWritten, RandomTokens, WithDistrain
    from distrain.telemetry.flops import device_name, peak_flops

    shape = SHAPES[params["shape"]]
    steps = params["warmup"] + params["rounds"] + 2
    data = RandomTokens(shape, shape.micro * steps)
    contestants: Dict[str, Any] = {}
    for i, (label, how) in enumerate(CONTESTANTS.items()):
        if how["kind"] == "hand":
            contestants[label] = HandWritten(shape, data, device, how["compile"], how["fused"])
        else:
            contestants[label] = WithDistrain(shape, data, params["scratch"], f"c{i}", how["train"])
    # Warm-up (compilation, optimizer state) happens in interleaved_rounds' untimed rounds; the memory pass
    # runs after them, one contestant at a time.
    timings = interleaved_rounds({k: c.step for k, c in contestants.items()}, params["rounds"], params["warmup"],
                                 device)
    memory = {label: _peak_memory(c, device, params["warmup"] + params["rounds"]) for label, c in contestants.items()}
    for c in contestants.values():
        c.close()
    peak = peak_flops(device, "bf16")
    tokens = shape.micro * shape.block
    rows = []
    for label in contestants:
        summary = stats.summary(timings.wall[label])
        per_s = tokens / summary["median"]
        rows.append({"label": label, "step": summary, "tokens_per_s": per_s,
                     "mfu": shape.flops_per_token() * per_s / peak.value if peak.value else None,
                     "peak_bytes": memory[label], "times": timings.wall[label]})
    ratios = {"tokens_vs_nanogpt": stats.ratio_of_medians(timings.wall[NANOGPT], timings.wall[OURS]),
              "overhead": stats.ratio_of_medians(timings.wall[OURS], timings.wall[SAME_BY_HAND]),
              "defaults_vs_eager": stats.ratio_of_medians(timings.wall["hand-written eager"],
                                                          timings.wall["distrain defaults"])}
    return {"shape": params["shape"], "shape_values": vars(shape), "params": shape.params(),
            "flops_per_token": shape.flops_per_token(), "device": device_name(device), "peak_flops": peak.value,
            "rows": rows, "ratios": ratios, "rounds": params["rounds"], "warmup": params["warmup"],
            "state_formula_bytes": 16 * shape.params()}


def _peak_memory(contestant: Any, device: torch.device, step: int) -> Optional[int]:
    """Peak bytes of one step of ``contestant`` as if it ran alone: what the step allocated above what was
    allocated before it (other contestants' state included there), plus its own resident parameters and optimizer
    state. None on a CPU (torch keeps no allocator statistics there)."""
    if device.type != "cuda":
        return None
    settle(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    contestant.step(step)
    settle(device)
    return torch.cuda.max_memory_allocated(device) - before + contestant.state_bytes()


def report(result: Dict[str, Any], ctx: Any) -> Section:
    s = result["shape_values"]
    on_gpu = result["peak_flops"] is not None
    lines = [f"**{result['shape']}** ({result['params']:,} parameters, vocabulary {s['vocab']}, {s['layers']} x "
             f"{s['embed']}, block {s['block']}, micro-batch {s['micro']}, bf16 autocast, AdamW, clip 1.0) on "
             f"**{result['device']}**; {result['rounds']} timed rounds after {result['warmup']} warm-up rounds.\n"]
    if not on_gpu:
        lines.append("**Tiny CPU mode** (no CUDA device): this checks that every contestant runs; the numbers say "
                     "nothing about a GPU and no target is checked. Run `python -m benchmarks gpu` on a GPU.\n")
    formula = result["state_formula_bytes"]
    lines += ["| contestant | median step ms (IQR) | tokens/s | MFU | peak memory | peak - 16Ψ |",
              "| --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        peak = row["peak_bytes"]
        lines.append(f"| {row['label']} | {row['step']['median'] * 1e3:.2f} ({row['step']['iqr'] * 1e3:.2f}) | "
                     f"{row['tokens_per_s']:,.0f} | {mfu} | {_size(peak)} | "
                     f"{_size(peak - formula) if peak is not None else 'n/a'} |")
    r = result["ratios"]
    lines += ["", f"16Ψ (the ZeRO paper's model states at one rank: fp32 weights, gradients and Adam moments) = "
                  f"{_size(formula)}; the rest of a peak is activations and temporaries.", "",
              "| comparison | ratio | 95% CI |", "| --- | --- | --- |",
              f"| tokens/s, distrain compile / nanoGPT's recipe | {r['tokens_vs_nanogpt']['ratio']:.3f} | "
              f"{r['tokens_vs_nanogpt']['ci_lo']:.3f}-{r['tokens_vs_nanogpt']['ci_hi']:.3f} |",
              f"| step time, distrain compile / the same settings by hand | {r['overhead']['ratio']:.3f} | "
              f"{r['overhead']['ci_lo']:.3f}-{r['overhead']['ci_hi']:.3f} |",
              f"| tokens/s, distrain defaults / hand-written eager | {r['defaults_vs_eager']['ratio']:.3f} | "
              f"{r['defaults_vs_eager']['ci_lo']:.3f}-{r['defaults_vs_eager']['ci_hi']:.3f} |"]
    checks: List[Check] = []
    if on_gpu:
        mfu = next(row["mfu"] for row in result["rows"] if row["label"] == OURS)
        checks = [check(NAME, "tokens/s: distrain compile / nanoGPT's compile + fused", r["tokens_vs_nanogpt"]["ratio"],
                        ">=", TARGETS["tokens_vs_nanogpt"]),
                  check(NAME, "step time: distrain compile / the same settings by hand", r["overhead"]["ratio"], "<=",
                        TARGETS["overhead"]),
                  check(NAME, "MFU of distrain compile", mfu, ">=", TARGETS["mfu"])]
    return Section(TITLE, "\n".join(lines), checks, [])


def _size(n: Optional[float]) -> str:
    return "n/a" if n is None else format_bytes(n, digits=2)
