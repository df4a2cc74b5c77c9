"""Suite 6, data loading: what DataLoader workers buy on a data-bound workload, and what feeding a GPU from token
shards costs against batches already on the device.

* **workers** (one rank): real PNG images on disk (the digits rendered at 448 px, about an ImageNet photo's
  size), decoded, resized and augmented per sample (>= 2 ms of CPU work each, measured and reported: about 2.9)
  feeding a small MLP, so the step is data-bound. Two
  Trainers in the same process, ``data.num_workers=0`` and ``=2``, train in alternating blocks of steps (not
  step by step: a prefetching loader would load during the other's step); the first steps of each block are not
  timed (the queue a loader filled before the other's block). Ratio: median(2 workers) / median(0); target <= 0.6.
* **feed** (every rank): the GPT-2 124M shape (12 layers, 12 heads, 768 wide, 1024 tokens, vocab 50257, bf16) fed
  from memory-mapped token shards through the loader, against the same Trainer fed batches already on the device;
  target <= 1.02 on a GPU. Without one it runs a tiny CPU shape (2 layers, 64 wide, 64 tokens), which only shows
  the suite runs: that number is no measure of the target.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import torch

from benchmarks import stats
from benchmarks.jobs import run_job
from benchmarks.options import Check, Options, Section, check
from benchmarks.workload import QUIET
from distrain.data.datasets import render_digits
from distrain.data.shard_writer import random_shards
from distrain.env import ProcessInfo

NAME = "data"
TITLE = "6. Data loading"
WORKERS_TARGET = 0.6
FEED_TARGET = 1.02
AUGMENT = {"rotate": 12, "translate": 0.1, "scale": 0.1, "flip": True, "brightness": 0.1, "contrast": 0.2}
GPT2 = {"embed": 768, "heads": 12, "layers": 12, "block": 1024, "vocab": 50257, "micro": 8, "precision": "bf16"}
TINY = {"embed": 64, "heads": 2, "layers": 2, "block": 64, "vocab": 4096, "micro": 8, "precision": "fp32"}


def run(opts: Options) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="distrain-bench-data-") as tmp:
        images = Path(tmp) / "png"
        render_digits(images, size=opts.pick(full=448, smoke=128), limit=opts.pick(full=600, smoke=64))
        workers = run_job(NAME, opts.job_params(part="workers", images=str(images), size=opts.pick(full=96, smoke=32),
                                                rounds=opts.timed_rounds(full=8, smoke=2),
                                                block=opts.pick(full=8, smoke=4)), 1, opts.threads_per_rank,
                          opts.timeout_s)
        shape = GPT2 if opts.device == "cuda" and not opts.smoke else TINY
        shards = random_shards(Path(tmp) / "tokens", shape["vocab"],
                               tokens=opts.pick(full=50_000_000, smoke=2_000_000) if shape is GPT2 else 2_000_000)
        feed = run_job(NAME, opts.job_params(part="feed", shards=str(shards), shape=shape,
                                             rounds=opts.timed_rounds(full=8, smoke=2),
                                             block=opts.pick(full=10, smoke=4)), opts.nproc, opts.threads_per_rank,
                       opts.timeout_s)
    return {"workers": workers, "feed": feed, "device": opts.device, "gpu_shape": shape is GPT2}


# --- inside the job's ranks ------------------------------------------------------------------------------------
def worker(params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    return _workers(params, device) if params["part"] == "workers" else _feed(params, info, device)


def _trainer(config: Dict[str, Any], scratch: str, name: str):
    from distrain.training.trainer import Trainer

    config = {**config, "run": {"name": name, "dir": scratch}}
    return Trainer(config, overrides=QUIET)


def _workers(params: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    from distrain.data import build_datasets
    from distrain.data.seeding import fetching

    data = {"name": "images", "kwargs": {"path": params["images"], "size": params["size"], "channels": 3,
                                         "augment": AUGMENT}, "eval_fraction": 0.0}
    train, _ = build_datasets("images", data["kwargs"], 0.0)
    started = time.process_time()
    for i in range(32):  # the CPU work of one sample, in this process (decode, resize, augment)
        with fetching(0, 0, i):
            train[i]
    per_sample = (time.process_time() - started) / 32
    base = {"model": {"name": "mlp", "kwargs": {"hidden": 8, "depth": 1}}, "train": {"global_batch": 32,
            "micro_batch": 8, "optimizer": "adamw"}, "dist": {"device": device.type}}
    trainers = {n: _trainer({**base, "data": {**data, "num_workers": n}}, params["scratch"], f"w{n}") for n in (0, 2)}
    skip = 2  # the steps a loader may have queued before its block: ceil(prefetch 2 x 2 workers / accum 4) + 1
    timings, cpu = _blocks({n: t.train_step for n, t in trainers.items()}, params["rounds"], params["block"], skip,
                           device)
    for t in trainers.values():
        t.close()
    return {"per_sample_cpu_s": per_sample, "global_batch": 32, "micro_batch": 8, "image": [3, params["size"]],
            "times": timings, "ratio": stats.ratio_of_medians(timings[2], timings[0]),
            "summary": {str(n): stats.summary(v) for n, v in timings.items()},
            "cpu": {str(n): stats.summary(v) for n, v in cpu.items()}, "rounds": params["rounds"],
            "block": params["block"], "skipped_per_block": skip}


def _feed(params: Dict[str, Any], info: ProcessInfo, device: torch.device) -> Dict[str, Any]:
    shape = params["shape"]
    micro = shape["micro"]
    config = {"model": {"name": "gpt", "kwargs": {"embed": shape["embed"], "heads": shape["heads"],
                                                 "layers": shape["layers"]}},
              "data": {"name": "tokens", "kwargs": {"path": params["shards"], "block_size": shape["block"],
                                                    "eval_windows": 1}},
              "train": {"global_batch": micro * info.world_size, "micro_batch": micro, "optimizer": "adamw",
                        "precision": shape["precision"]}, "dist": {"device": device.type}}
    loaded = _trainer(config, params["scratch"], "loaded")
    resident = _trainer(config, params["scratch"], "resident")
    batches = resident.loader.micro_batches(0)
    resident.loader.close()
    resident.loader = ResidentBatches(batches)  # the same batches, on the device, every step
    timings, _ = _blocks({"loaded": loaded.train_step, "resident": resident.train_step}, params["rounds"],
                      params["block"], 2, device)
    options = loaded.loader_options.describe()
    for t in (loaded, resident):
        t.close()
    return {"shape": shape, "world_size": info.world_size, "loader": options, "times": timings,
            "ratio": stats.ratio_of_medians(timings["loaded"], timings["resident"]),
            "summary": {k: stats.summary(v) for k, v in timings.items()}, "rounds": params["rounds"],
            "block": params["block"]}


class ResidentBatches:
    """A stand-in for the Trainer's loader that hands out batches already on the device (the no-loading baseline)."""

    def __init__(self, batches: List[Any]):
        self.batches = batches

    def micro_batches(self, step: int) -> List[Any]:
        return self.batches

    def close(self) -> None:
        pass


def _blocks(steps: Dict[Any, Callable[[int], Any]], rounds: int, block: int, skip: int, device: torch.device
            ) -> Tuple[Dict[Any, List[float]], Dict[Any, List[float]]]:
    """Per round, each contestant's mean wall seconds per step over its block, and the training process's CPU
    seconds per step (blocks alternate; the first ``skip`` steps of a block are run but not timed). Every contestant
    runs consecutive global steps across its blocks."""
    from distrain import dist

    next_step = {k: 0 for k in steps}
    wall: Dict[Any, List[float]] = {k: [] for k in steps}
    cpu: Dict[Any, List[float]] = {k: [] for k in steps}
    for r in range(rounds + 1):  # round 0 warms up (workers start, first allocations)
        for key in (list(steps) if r % 2 else list(reversed(list(steps)))):
            times, cpu_times = [], []
            for i in range(block):
                dist.barrier()
                _sync(device)
                start, cpu_start = time.perf_counter(), time.process_time()
                steps[key](next_step[key])
                _sync(device)
                dist.barrier()
                next_step[key] += 1
                if i >= skip:
                    times.append(time.perf_counter() - start)
                    cpu_times.append(time.process_time() - cpu_start)
            if r:
                wall[key].append(statistics.mean(times))
                cpu[key].append(statistics.mean(cpu_times))
    return wall, cpu


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the report ------------------------------------------------------------------------------------------------
def report(result: Dict[str, Any], ctx: Any) -> Section:
    w, f = result["workers"], result["feed"]
    checks: List[Check] = [check(NAME, "data-bound step, 2 workers / 0 workers (W=1)", w["ratio"]["ratio"], "<=",
                                 WORKERS_TARGET, note=f"{w['per_sample_cpu_s'] * 1e3:.1f} ms CPU per sample")]
    lines = [f"**Workers** (W=1, one rank with its DataLoader; global batch {w['global_batch']} = micro "
             f"{w['micro_batch']} x accum {w['global_batch'] // w['micro_batch']}; PNG images decoded, resized to "
             f"{w['image'][1]} px RGB and augmented: **{w['per_sample_cpu_s'] * 1e3:.2f} ms of CPU per sample**; "
             f"{w['rounds']} rounds of {w['block']}-step blocks, the first {w['skipped_per_block']} of each untimed)\n",
             *_table("data.num_workers", {n: w["summary"][n] for n in ("0", "2")})]
    r = w["ratio"]
    lines += ["", f"Ratio 2 workers / 0: **{r['ratio']:.3f}** (95% CI {r['ci_lo']:.3f}-{r['ci_hi']:.3f}; target "
                  f"<= {WORKERS_TARGET}). The training process's own CPU time per step (all its threads): "
                  + ", ".join(f"{n} workers {w['cpu'][n]['median'] * 1e3:.1f} ms" for n in ("0", "2"))
                  + " — the decoding the workers took off it. The wall-clock ratio needs the cores to be free: on a "
                  "machine shared with other sessions (Linux groups CPU time by session, autogroup), extra worker "
                  "processes get no extra share, and the ratio tends to 1.", ""]
    shape = f["shape"]
    what = ("the GPT-2 124M shape" if result["gpu_shape"] else
            "a **tiny CPU shape** (no GPU here: this only shows the suite runs, it is no measure of the target)")
    lines += [f"**Feeding from token shards** ({what}: {shape['layers']} layers, {shape['heads']} heads, "
              f"{shape['embed']} wide, {shape['block']} tokens, vocab {shape['vocab']}, {shape['precision']}, micro "
              f"batch {shape['micro']} x {f['world_size']} ranks on {result['device']}; {f['loader']})\n",
              *_table("batches", {"from token shards (loader)": f["summary"]["loaded"],
                                  "already on the device": f["summary"]["resident"]})]
    r = f["ratio"]
    lines += ["", f"Ratio loaded / resident: **{r['ratio']:.3f}** (95% CI {r['ci_lo']:.3f}-{r['ci_hi']:.3f}; "
                  f"target <= {FEED_TARGET} on a GPU)."]
    if result["gpu_shape"]:
        checks.append(check(NAME, "GPT-2 124M step fed from token shards / batches on the device", r["ratio"], "<=",
                            FEED_TARGET))
    return Section(TITLE, "\n".join(lines), checks, [])


def _table(label: str, rows: Dict[str, Dict[str, float]]) -> List[str]:
    """A markdown table of median step times (IQR) in ms, one row per contestant."""
    return [f"| {label} | median ms per step (IQR) |", "| --- | --- |"] + [
        f"| {name} | {s['median'] * 1e3:.2f} ({s['iqr'] * 1e3:.2f}) |" for name, s in rows.items()]
