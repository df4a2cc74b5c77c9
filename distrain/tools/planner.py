"""`distrain plan`: memory per rank and communication per step of each strategy, from the parameter count.

The model is built on the meta device (no memory), giving Psi, its number of parameters. Each strategy's
model states per rank then follow the ZeRO paper's accounting (Rajbhandari et al., 2020, section 3), applied to
the bytes distrain's engines really keep:

* fp32 training (and bf16 autocast, which keeps fp32 weights, gradients and optimizer state): 4 bytes of
  parameter, 4 of gradient and K of optimizer state per parameter (K = 8 for Adam/AdamW, 4 for SGD with
  momentum, 0 without). With Adam: ddp 16Psi; zero1 8Psi + 8Psi/N; zero2 4Psi + 12Psi/N; zero3 16Psi/N.
* The paper's mixed-precision Adam (DeepSpeed with bf16/fp16): 2 + 2 bytes of half-precision parameter and
  gradient, K = 12 (fp32 master copy, momentum, variance): stage 1 4Psi + 12Psi/N, stage 2 2Psi + 14Psi/N,
  stage 3 16Psi/N.

Communication per step is what each rank sends with ring collectives: an all-reduce of n bytes sends
2(N-1)/N x n, an all-gather or reduce-scatter (N-1)/N x n. Activations are not model states and are not
counted (they depend on the batch, not on the strategy); the plan says so.

Across nodes (``--nodes M``, ranks numbered node by node) the traffic splits into what stays inside a node and what
crosses to another: a ring over all N ranks crosses a node boundary on M of its N links, so M/N of what a rank sends
goes between nodes. HSDP (fsdp with R replicas of S = N/R ranks, one per node) shards over S: model states 16Ψ/S,
gathers and reduce-scatters within the node, and only an all-reduce of each rank's gradient shard, 2(R-1)/R x 4Ψ/S,
between nodes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from distrain.config import batch_plan
from distrain.data import build_datasets
from distrain.errors import DistrainError
from distrain.models import build_model
from distrain.models.blocks import find_blocks
from distrain.strategies import STRATEGIES, strategy_class
from distrain.strategies.placement import AUTO_REPLICATE, FULL, SHARD, Layout
from distrain.telemetry.units import format_bytes
from distrain.tools.micro_fit import activation_bytes_per_sample, fitting_micro_batch


def layouts() -> List[Layout]:
    """Every registered strategy's layouts, as each strategy class declares them (``Strategy.layouts``)."""
    return declared_layouts()[0]


def declared_layouts() -> Tuple[List[Layout], Dict[str, str]]:
    """(every importable strategy's layouts, {strategy whose module does not import here: why})."""
    found: List[Layout] = []
    unavailable: Dict[str, str] = {}
    for name in STRATEGIES:
        try:
            found.extend(strategy_class(name).layouts())
        except DistrainError:
            unavailable[name] = "registered, not installed"
    return found, unavailable


def optimizer_bytes_per_param(train: DictConfig) -> int:
    """fp32 optimizer state bytes per parameter: Adam/AdamW two moments (8), SGD momentum buffer (4) or none."""
    if train.optimizer in ("adam", "adamw"):
        return 8
    return 4 if float(train.momentum) > 0 else 0


@dataclass
class Estimate:
    layout: Layout
    world_size: int
    params: float  # bytes per rank
    grads: float
    optimizer: float  # optimizer state, with DeepSpeed's fp32 master copy where it keeps one
    peak_extra: float  # transient unsharded parameters/gradients during the step
    comm_bytes: float  # bytes each rank sends per step (averaged over the sync period)
    formula: str
    inter_node: float = 0.0  # of comm_bytes, what crosses between nodes (the rest stays inside a node)
    replicate: int = 1  # HSDP's replicas (1: sharded over all N ranks)

    @property
    def intra_node(self) -> float:
        return self.comm_bytes - self.inter_node

    @property
    def states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def peak(self) -> float:
        return self.states + self.peak_extra


def estimate(layout: Layout, n_params: int, world_size: int, train: DictConfig, largest_unit: int = 0,
             grad_accum: int = 1, backend: str = "gloo", nodes: int = 1) -> Estimate:
    """Bytes per rank and bytes sent per step for ``layout`` on a model of ``n_params`` parameters, with the
    world's ranks spread over ``nodes`` nodes."""
    replicate = nodes if layout.replicate == AUTO_REPLICATE else layout.replicate
    n = world_size // replicate  # what a "shard" state is split over: every rank, or one HSDP replica's ranks
    psi = float(n_params)
    half = layout.half_precision_states and train.precision in ("bf16", "fp16")
    p_bytes, g_bytes = (2, 2) if half else (4, 4)
    k = optimizer_bytes_per_param(train)
    master = layout.master_half if half else layout.master_fp32

    def share(kind: str, total: float) -> float:
        return total / n if kind == SHARD else total if kind == FULL else 0.0

    params, grads = share(layout.params, p_bytes * psi), share(layout.grads, g_bytes * psi)
    optim = share(layout.optimizer, k * psi) + share(master, 4 * psi)
    regathers = layout.regather_in_backward_above is not None and psi > layout.regather_in_backward_above
    peak_unsharded = "unit" if regathers else layout.peak_unsharded
    if peak_unsharded == "model":
        extra = p_bytes * psi * (n - 1) / n
    elif peak_unsharded == "unit":
        extra = (p_bytes + g_bytes) * largest_unit * (n - 1) / n
    else:
        extra = 0.0
    ring = (n - 1) / n if n > 1 else 0.0
    reduce_factor = ring if layout.sharded_reduce and backend == "nccl" else 2 * ring
    reductions = grad_accum if layout.reduce_every_micro_step else 1
    per_micro = layout.gathers_per_micro_step + (1.0 if regathers else 0.0)
    gathers = layout.gathers_per_step + per_micro * grad_accum
    sent = (reductions * reduce_factor + gathers * ring) * g_bytes * psi / layout.every
    terms = [(layout.params, p_bytes), (layout.grads, g_bytes), (layout.optimizer, k), (master, 4)]
    if replicate > 1:  # the replicas all-reduce their reduce-scattered gradient shards, across nodes
        across = 2 * (replicate - 1) / replicate * g_bytes * psi / n
        return Estimate(layout, world_size, params, grads, optim, extra, sent + across, formula(terms, "S"), across,
                        replicate)
    inter = sent * nodes / world_size if nodes > 1 else 0.0  # a flat ring's links that cross a node boundary
    return Estimate(layout, world_size, params, grads, optim, extra, sent, formula(terms), inter)


def formula(terms: Sequence[tuple], shards: str = "N") -> str:
    """The per-rank formula in the paper's notation from (placement, bytes per parameter) terms, e.g. 8Ψ + 8Ψ/N;
    ``shards`` names what sharded states are split over (S: one HSDP replica's ranks)."""
    whole = sum(b for kind, b in terms if kind == FULL)
    split = sum(b for kind, b in terms if kind == SHARD)
    parts = ([f"{whole}Ψ"] if whole else []) + ([f"{split}Ψ/{shards}"] if split else [])
    return " + ".join(parts) or "0"


@dataclass
class Plan:
    config_name: str
    model: str
    n_params: int
    largest_unit: int
    world_size: int
    grad_accum: int
    backend: str
    nodes: int
    mem_per_rank: Optional[float]  # bytes; None = no limit given
    estimates: List[Estimate]
    unavailable: Dict[str, str]
    recommended: Optional[Estimate]
    precision: str = "fp32"
    optimizer: str = "adamw"
    device_memory: Optional[float] = None  # bytes (--device-memory-gb): which micro-batch each strategy fits
    per_rank: int = 0  # samples per rank and step (global_batch / world)
    activations_per_sample: int = 0  # bytes, measured (distrain.tools.micro_fit)

    def fits(self, e: Estimate) -> bool:
        return self.mem_per_rank is None or e.peak <= self.mem_per_rank

    def micro_batch(self, e: Estimate) -> str:
        """The micro-batch ``e``'s strategy is expected to fit in the device memory ("-" when none fits)."""
        assert self.device_memory is not None
        fit = fitting_micro_batch(self.per_rank, self.device_memory, e.peak, self.activations_per_sample)
        return str(fit) if fit is not None else "-"


def count_parameters(cfg: DictConfig) -> tuple:
    """(parameters, parameters of the largest shardable unit) of the config's model, built on the meta device."""
    import torch  # lazy: start-up: torch takes seconds to import


    train, _ = build_datasets(cfg.data.name, cfg.data.kwargs, cfg.data.eval_fraction)
    with torch.device("meta"):
        model = build_model(cfg.model.name, cfg.model.kwargs, train.spec)
    total = sum(p.numel() for p in model.parameters())
    units = find_blocks(model, None, key="strategy.kwargs.wrap")  # FSDP's auto wrap units
    largest = max((sum(p.numel() for p in u.parameters()) for u in units), default=0)
    root_only = total - sum(sum(p.numel() for p in u.parameters()) for u in units)
    return total, max(largest, root_only)


def plan_backend(cfg: DictConfig) -> str:
    """The collective backend the run would use: dist.backend, or for auto nccl with CUDA and gloo without."""
    if cfg.dist.backend != "auto":
        return str(cfg.dist.backend)
    import torch  # lazy: start-up: torch takes seconds to import

    cuda = cfg.dist.device == "cuda" or (cfg.dist.device == "auto" and torch.cuda.is_available())
    return "nccl" if cuda else "gloo"


def make_plan(cfg: DictConfig, world_size: int, mem_per_rank_gb: Optional[float] = None,
              only: Sequence[str] = (), n_params: Optional[int] = None, largest_unit: int = 0,
              backend: Optional[str] = None, device_memory_gb: Optional[float] = None, nodes: int = 1) -> Plan:
    """Estimates for every layout at ``world_size`` ranks on ``nodes`` nodes, and the fastest exact one that fits in
    ``mem_per_rank_gb``. HSDP (one replica per node) is planned only on several nodes: on one it is plain FSDP.

    Raises ConfigError when the config's global batch does not split over ``world_size`` ranks.
    """
    batches = batch_plan(cfg, world_size)
    accum = batches.grad_accum
    backend = backend or plan_backend(cfg)
    if n_params is None:
        n_params, largest_unit = count_parameters(cfg)
    limit = mem_per_rank_gb * 2**30 if mem_per_rank_gb is not None else None
    declared, unavailable = declared_layouts()
    estimates = [estimate(layout, n_params, world_size, cfg.train, largest_unit, accum, backend, nodes)
                 for layout in declared if (not only or layout.label in only)
                 and (layout.replicate != AUTO_REPLICATE or nodes > 1)]
    plan = Plan(str(cfg.run.name), str(cfg.model.name), n_params, largest_unit, world_size, accum, backend, nodes,
                limit, estimates, unavailable, None, str(cfg.train.precision), str(cfg.train.optimizer))
    if device_memory_gb is not None:
        plan.device_memory, plan.per_rank = device_memory_gb * 2**30, batches.per_rank
        plan.activations_per_sample = activation_bytes_per_sample(cfg)
    fitting = [e for e in estimates if e.layout.exact and plan.fits(e)]
    # Fastest: least traffic over the slow links between nodes, then per step in all, then fewer collectives and
    # less engine machinery.
    plan.recommended = min(fitting, key=lambda e: (round(e.inter_node), round(e.comm_bytes), e.layout.speed_rank),
                           default=None)
    return plan



def format_plan(plan: Plan) -> str:
    """The plan as the table `distrain plan` prints."""
    lines = [f"model {plan.model}: Ψ = {plan.n_params:,} parameters (largest shardable unit {plan.largest_unit:,}); "
             f"world size N = {plan.world_size}, grad_accum {plan.grad_accum}, {plan.backend}, "
             f"{plan.precision} {plan.optimizer}" + (f", {plan.nodes} nodes" if plan.nodes > 1 else "")
             + (f"; memory per rank {format_bytes(plan.mem_per_rank, 2)}" if plan.mem_per_rank is not None else ""), ""]
    micro, nodes = plan.device_memory is not None, plan.nodes > 1
    header = (f"{'strategy':<22} {'formula':<14} {'params':>11} {'grads':>11} {'optimizer':>11} {'states':>11} "
              f"{'peak':>11} {'sent/step':>11}" + (f" {'intra-node':>11} {'inter-node':>11}" if nodes else "")
              + "  fits" + ("  micro_batch" if micro else ""))
    lines += [header, "-" * len(header)]
    for e in plan.estimates:
        fit = "yes" if plan.fits(e) else "NO"
        label = e.layout.label + (f" {e.replicate}x{e.world_size // e.replicate}" if e.replicate > 1 else "")
        split = f" {format_bytes(e.intra_node, 2):>11} {format_bytes(e.inter_node, 2):>11}" if nodes else ""
        lines.append(f"{label:<22} {e.formula:<14} {format_bytes(e.params, 2):>11} {format_bytes(e.grads, 2):>11} "
                     f"{format_bytes(e.optimizer, 2):>11} {format_bytes(e.states, 2):>11} {format_bytes(e.peak, 2):>11} "
                     f"{format_bytes(e.comm_bytes, 2):>11}{split}  {fit:<4}"
                     + (f"  {plan.micro_batch(e):>11}" if micro else ""))
    lines.append("")
    if micro:
        lines.append(f"micro_batch: the largest divisor of the per-rank share ({plan.per_rank}) whose activations "
                     f"({format_bytes(plan.activations_per_sample, 2)} per sample, measured on the meta device) fit "
                     f"beside the peak in {format_bytes(plan.device_memory, 2)} of device memory; compare it with what "
                     f"train.micro_batch=auto finds (docs/out-of-memory.md).")
    lines.append("states: parameters + gradients + optimizer state per rank (ZeRO accounting); peak adds what a "
                 "sharded strategy gathers during the step. Activations are extra and depend on micro_batch.")
    if nodes:
        lines.append(f"sent/step = intra-node + inter-node, per rank, ranks numbered node by node "
                     f"({plan.world_size // plan.nodes} a node); hsdp RxS: R replicas (one per node) of S shards, "
                     f"S = N/R.")
    if plan.unavailable:
        lines.append("not available here: " + ", ".join(f"{k} ({v})" for k, v in plan.unavailable.items()))
    if plan.recommended is not None:
        r = plan.recommended
        lines.append(f"recommended: {r.layout.label} (strategy.name={r.layout.strategy}"
                     + "".join(f" strategy.kwargs.{k}={v}" for k, v in r.layout.kwargs.items())
                     + "): the least communication " + ("between nodes, then " if nodes else "")
                     + "per step among the exact strategies that fit.")
    else:
        lines.append("recommended: none fits: add ranks (--world), lower the memory need (bf16 with DeepSpeed, "
                     "a smaller model), or give each rank more memory.")
    return "\n".join(lines)
