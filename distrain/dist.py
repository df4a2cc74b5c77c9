"""Process group lifecycle and the few collectives the trainer itself needs (metrics, barriers)."""

from __future__ import annotations

import datetime
import os
import socket
import time
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

from distrain.env import ProcessInfo
from distrain.errors import ConfigError, DistributedError
from distrain.ports import describe_owner


def resolve_device(requested: str, info: ProcessInfo) -> torch.device:
    """auto: this rank's CUDA device (by local rank) when CUDA is there, else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("dist.device=cuda but no CUDA device is visible to this process. Use dist.device=auto "
                              "or cpu, or check CUDA_VISIBLE_DEVICES and the driver.", key="dist.device")
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def device_of_run(dist_cfg: Any, info: ProcessInfo, given: Optional[torch.device] = None) -> torch.device:
    """This process's device: ``given`` (an integration's own, e.g. Ray Train's), else ``dist.device`` resolved,
    after checking the node has a GPU for each of its processes."""
    if given is not None:
        return torch.device(given)
    check_gpus_per_node(info.local_world_size, torch.cuda.device_count(), dist_cfg.backend, dist_cfg.device)
    return resolve_device(dist_cfg.device, info)


def resolve_backend(requested: str, device: torch.device) -> str:
    """auto: nccl for CUDA tensors, gloo for CPU tensors."""
    if requested == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if requested == "nccl" and device.type != "cuda":
        raise ConfigError("dist.backend=nccl needs CUDA devices, but this run is on the CPU. Use dist.backend=gloo "
                          "(or auto).", key="dist.backend")
    return requested


def check_gpus_per_node(processes: int, visible_gpus: int, backend: str, device: str) -> None:
    """Refuse more NCCL ranks on a node than it has visible GPUs, before any of them starts.

    NCCL gives every rank a GPU of its own; two ranks on one GPU die in their first collective ("Duplicate GPU
    detected"). gloo can share a GPU between processes. ``backend`` and ``device`` are the config's settings
    (auto included); ``visible_gpus`` is what this node shows (torch.cuda.device_count()).
    """
    uses_cuda = device == "cuda" or (device == "auto" and visible_gpus > 0)
    if not uses_cuda or backend == "gloo" or processes <= visible_gpus:
        return
    if visible_gpus == 0:
        raise ConfigError(f"dist.device=cuda with {processes} process(es) on this node, but no CUDA device is "
                          f"visible. Use dist.device=auto or cpu, or check CUDA_VISIBLE_DEVICES and the driver.",
                          key="dist.device")
    raise ConfigError(f"{processes} processes on this node would use NCCL, but it has {visible_gpus} visible GPU(s): "
                      f"NCCL needs one GPU per process. Start at most {visible_gpus} process(es) per node "
                      f"(--nproc-per-node {visible_gpus}), or set dist.backend=gloo to let processes share a GPU "
                      f"(slower), or dist.device=cpu.", key="dist.backend")


def init_process_group(info: ProcessInfo, backend: str, device: torch.device, timeout_s: float,
                       local_group: bool = True) -> bool:
    """Join the job's process group; returns True when this call created it (and so should destroy it).

    A group that already exists (a user who initialised it, or a second Trainer in one script) is reused.
    A single process gets a one-rank group on an in-memory store when ``local_group`` is set, so sharding
    strategies run unchanged at world size 1 (no port, no rendezvous).
    """
    if torch_dist.is_initialized() or (not info.distributed and not local_group):
        return False
    kwargs = {"device_id": device} if backend == "nccl" else {}
    timeout = datetime.timedelta(seconds=timeout_s)
    if not info.distributed:
        torch_dist.init_process_group(backend=backend, store=torch_dist.HashStore(), rank=0, world_size=1,
                                      timeout=timeout, **kwargs)
        return True
    os.environ.setdefault("MASTER_ADDR", info.master_addr)
    os.environ.setdefault("MASTER_PORT", str(info.master_port))
    try:
        torch_dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size, timeout=timeout,
                                      **kwargs)
    except (torch_dist.DistNetworkError, torch_dist.DistStoreError) as err:
        raise _rendezvous_error(err, info, timeout_s) from None
    return True


def _rendezvous_error(err: Exception, info: ProcessInfo, timeout_s: float) -> DistributedError:
    """One paragraph for a rendezvous that failed: a port someone else holds, ranks that never came, or the rest."""
    addr, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    detail = " ".join(str(err).split())
    where = f"Rank {info.rank} of {info.world_size} on {socket.gethostname()}"
    if "EADDRINUSE" in detail or "address already in use" in detail.lower():
        return DistributedError(
            f"{where} could not open the rendezvous at MASTER_ADDR:MASTER_PORT = {addr}:{port}: the port is already in "
            f"use by {describe_owner(int(port))}. Start the job with a free port (MASTER_PORT=<port>, or "
            f"--rdzv-endpoint HOST:<port>; `distrain doctor` suggests one), or stop that process.")
    if isinstance(err, torch_dist.DistStoreError) or "timed out" in detail.lower() or "timeout" in detail.lower():
        return DistributedError(
            f"{where} waited dist.timeout_s={timeout_s:g} s at the rendezvous {addr}:{port} and not all "
            f"{info.world_size} ranks arrived. Check that every rank was started with the same MASTER_ADDR, "
            f"MASTER_PORT and WORLD_SIZE, that {addr}:{port} is reachable from every host (firewall; "
            f"GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME on multi-homed hosts), and that no rank crashed at start-up "
            f"(its log is in <run dir>/logs/). Torch said: {detail[:300]}")
    return DistributedError(f"{where} could not join the process group at {addr}:{port}: {detail[:300]}. Check the "
                            f"address and port, and that rank 0 is running.")


def destroy_process_group() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def leave_process_group(wait_for_peers: bool) -> None:
    """Tear down the group this process made; ``wait_for_peers`` (a clean exit): a barrier first, so no rank tears
    the group down while a peer is still talking to it (after a failure a peer may be gone: no barrier)."""
    if wait_for_peers:
        barrier()
    # gloo's worker thread frees the last collective's work object (the barrier's; after a failure, e.g. the resume
    # decision's broadcast) just after waking us, and needs the GIL for it; if we dropped the group (its destructor
    # joins that thread, holding the GIL) in that window, both would wait forever. Seen about once in 12 runs on a
    # loaded machine; a short GIL-free sleep lets the worker finish first.
    time.sleep(0.2)
    destroy_process_group()


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def barrier() -> None:
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place (a no-op in a single process)."""
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def per_rank_vector(values: torch.Tensor) -> list:
    """Every rank's 1-D ``values`` (k numbers), as a list indexed by rank of k-lists: one all-reduce of a (world, k)
    float64 tensor where each rank fills its own row. On the device of ``values``; reading it back syncs once."""
    values = values.detach().reshape(-1).to(torch.float64)
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return [values.cpu().tolist()]
    rows = torch.zeros(torch_dist.get_world_size(), values.numel(), dtype=torch.float64, device=values.device)
    rows[torch_dist.get_rank()] = values
    torch_dist.all_reduce(rows, op=torch_dist.ReduceOp.SUM)
    return rows.cpu().tolist()


def per_rank(value: torch.Tensor) -> list:
    """Every rank's value of a scalar tensor, as a list indexed by rank (one all-reduce)."""
    return [row[0] for row in per_rank_vector(value.reshape(1))]


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s Python object on every rank (small things only: paths, decisions)."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: object, group: object = None) -> list:
    """Every rank's Python object, in rank order (on ``group``, default: the whole job)."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size(group) > 1):
        return [obj]
    out: list = [None] * torch_dist.get_world_size(group)
    torch_dist.all_gather_object(out, obj, group=group)
    return out
