"""`distrain plan`: the ZeRO formulas it applies, its command line, and its predictions against the memory and
traffic that real gloo processes measure (the memory benchmark suite's own jobs)."""

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from distrain.tools.planner import estimate, layouts

PSI = 1_000_000
BY_LABEL = {layout.label: layout for layout in layouts()}


def _train(precision: str = "fp32", optimizer: str = "adamw"):
    return OmegaConf.create({"precision": precision, "optimizer": optimizer, "momentum": 0.9})


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_mixed_precision_deepspeed_follows_the_zero_paper(n):
    # Rajbhandari et al. 2020, mixed-precision Adam (K = 12): stage 1 4Ψ+12Ψ/N, stage 2 2Ψ+14Ψ/N, stage 3 16Ψ/N.
    paper = {1: 4 * PSI + 12 * PSI / n, 2: 2 * PSI + 14 * PSI / n, 3: 16 * PSI / n}
    for stage, expected in paper.items():
        e = estimate(BY_LABEL[f"deepspeed stage {stage}"], PSI, n, _train("bf16"))
        assert e.states == pytest.approx(expected), stage


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_fp32_analogue_of_the_formulas(n):
    # fp32 (CPU): params 4Ψ, grads 4Ψ, Adam 8Ψ -> ddp 16Ψ, zero1 8Ψ+8Ψ/N, zero2 4Ψ+12Ψ/N, zero3 16Ψ/N.
    expected = {"ddp": 16 * PSI, "zero1": 8 * PSI + 8 * PSI / n, "fsdp (full shard)": 16 * PSI / n,
                "fsdp (shard grad op)": 16 * PSI / n,  # FSDP2 reshards after backward: ZeRO-3 at rest
                # DeepSpeed steps on a separate fp32 copy of each partition even in fp32: 4 bytes more.
                "deepspeed stage 1": 8 * PSI + 12 * PSI / n, "deepspeed stage 2": 4 * PSI + 16 * PSI / n,
                "deepspeed stage 3": 20 * PSI / n}
    for label, value in expected.items():
        assert estimate(BY_LABEL[label], PSI, n, _train()).states == pytest.approx(value), label
    # SGD with momentum keeps one buffer (4 bytes), plain SGD none.
    assert estimate(BY_LABEL["ddp"], PSI, n, _train(optimizer="sgd")).states == pytest.approx(12 * PSI)


def test_traffic_per_step_of_ring_collectives():
    n, g = 4, 4 * PSI
    ring = (n - 1) / n
    assert estimate(BY_LABEL["ddp"], PSI, n, _train()).comm_bytes == pytest.approx(2 * ring * g)
    assert estimate(BY_LABEL["zero1"], PSI, n, _train()).comm_bytes == pytest.approx(3 * ring * g)
    # FSDP full shard on NCCL: all-gather in forward and in backward, one reduce-scatter: 3(N-1)/N (ZeRO-3).
    full = estimate(BY_LABEL["fsdp (full shard)"], PSI, n, _train(), backend="nccl")
    assert full.comm_bytes == pytest.approx(3 * ring * g)
    h = BY_LABEL["local_sgd (H=4)"]
    assert estimate(h, PSI, n, _train()).comm_bytes == pytest.approx(2 * ring * g / 4)


def test_plan_command_flags_what_does_not_fit_and_recommends():
    # gpt example: Ψ = 116,352; ddp needs 16Ψ = 1.78 MiB per rank, zero1 at N=2 12Ψ = 1.33 MiB.
    proc = run_cli(["plan", "configs/gpt.yaml", "--world", "2", "--mem-per-rank", "0.0015"])
    assert proc.returncode == 0, proc.stderr
    rows = {line.split("  ")[0].strip(): line for line in proc.stdout.splitlines()}
    assert "Ψ = 116,352" in proc.stdout
    assert rows["ddp"].rstrip().endswith("NO") and rows["zero1"].rstrip().endswith("yes")
    assert "recommended: zero1" in proc.stdout

    nothing = run_cli(["plan", "configs/gpt.yaml", "--world", "2", "--mem-per-rank", "0.0001"])
    assert nothing.returncode == 1 and "none fits" in nothing.stdout

    bad = run_cli(["plan", "configs/gpt.yaml", "--world", "0"])
    assert bad.returncode == 2 and "--world 0" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # minutes of real multi-rank runs: the default run stays under 15 min; CI runs -m slow
def test_predictions_match_measured_memory_and_traffic_with_real_processes():
    """The memory suite's jobs at W=2 and W=3: every strategy's memory_report and profiled collectives."""
    from benchmarks.options import Options
    from benchmarks.suites import memory

    # Every engine family once (accelerate and deepspeed stage 0 keep DDP's layout; stage 1 is covered by zero1
    # and stage 2) keeps this within a minute.
    only = ["ddp", "zero1", "fsdp (full shard)", "fsdp (shard grad op)", "deepspeed stage 2", "deepspeed stage 3",
            "local_sgd (H=4)"]
    result = memory.run(Options(), worlds=[2, 3], only=only)
    rows = memory.compare(result)
    measured = {(r["world"], r["label"]) for r in rows}
    for w in (2, 3):
        for label in ("ddp", "zero1", "fsdp (full shard)", "fsdp (shard grad op)"):
            assert (w, label) in measured, f"{label} at W={w} was not measured"
    for r in rows:
        assert abs(r["error"]) <= 0.10, (f"W={r['world']} {r['label']}: measured {r['measured_mean']:.0f} B/rank, "
                                         f"planner {r['predicted']:.0f} ({r['formula']})")
        assert r["sent_measured"] == pytest.approx(r["sent_predicted"], rel=0.10), \
            f"W={r['world']} {r['label']}: sent {r['sent_measured']:.0f} B/step, planner {r['sent_predicted']:.0f}"


def test_hsdp_shards_within_a_node_and_all_reduces_shards_between_nodes():
    # 16 ranks on 4 nodes: R = 4 replicas (one per node) of S = 4 shards.
    n, nodes, s, g = 16, 4, 4, 4 * PSI
    hsdp = estimate(BY_LABEL["hsdp (full shard)"], PSI, n, _train(), backend="nccl", nodes=nodes)
    assert hsdp.replicate == nodes and hsdp.formula == "16Ψ/S"
    assert hsdp.states == pytest.approx(16 * PSI / s)  # sharded over a node's 4 ranks, not all 16
    # Inside a node: two all-gathers and a reduce-scatter over S; between nodes: an all-reduce of the 1/S shard.
    assert hsdp.intra_node == pytest.approx(3 * (s - 1) / s * g)
    assert hsdp.inter_node == pytest.approx(2 * (nodes - 1) / nodes * g / s)
    # Flat FSDP over 16 ranks: M of the ring's N links cross a node boundary.
    flat = estimate(BY_LABEL["fsdp (full shard)"], PSI, n, _train(), backend="nccl", nodes=nodes)
    assert flat.inter_node == pytest.approx(flat.comm_bytes * nodes / n) and flat.inter_node > hsdp.inter_node
    # One node: "auto" is one replica, plain FSDP.
    assert estimate(BY_LABEL["hsdp (full shard)"], PSI, n, _train(), nodes=1).states == pytest.approx(16 * PSI / n)


def test_plan_with_nodes_shows_hsdp_and_the_traffic_inside_and_between_nodes(capsys):
    from conftest import run_cli_here

    code, out, err = run_cli_here(["plan", "configs/gpt.yaml", "--world", "16", "--nodes", "4", "dist.backend=nccl",
                                   "train.micro_batch=2"],
                                  capsys)
    assert code == 0, err
    assert "intra-node" in out and "inter-node" in out and "hsdp (full shard) 4x4" in out
    assert "recommended: hsdp (full shard)" in out and "strategy.kwargs.replicate=auto" in out
    code, out, _ = run_cli_here(["plan", "configs/gpt.yaml", "--world", "2"], capsys)
    assert code == 0 and "hsdp" not in out and "inter-node" not in out  # one node: nothing between nodes
    code, _, err = run_cli_here(["plan", "configs/gpt.yaml", "--world", "16", "--nodes", "3"], capsys)
    assert code == 2 and "--nodes 3" in err and "Traceback" not in err
