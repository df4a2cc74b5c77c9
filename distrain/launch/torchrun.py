"""`distrain launch`: validate the config for the whole world first, then hand over to torch.distributed.run.

torchrun's elastic agent does the real work (spawning, rendezvous, restarts, error files); this module only
translates our flags into its arguments and its failures into one readable paragraph.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
from typing import Any, Dict, List, Optional, Tuple

from distrain.config import load_config
from distrain.env.base import available_cpus
from distrain.env.kubeflow import torchrun_settings
from distrain.env.parent_death import LAUNCHER_PID_ENV
from distrain.errors import DistrainError, DistributedError, UsageError
from distrain.launch.rendezvous import WaitingForNodes, node_range, timeout_message
from distrain.ports import describe_owner, free_port, is_local_host, port_in_use, port_owner


def _world_sizes(args: argparse.Namespace) -> List[int]:
    """Every number of workers the job may have (one, or one per node count of an elastic MIN:MAX range)."""
    min_nodes, max_nodes = node_range(str(args.nnodes), "--nnodes")
    return [nodes * args.nproc_per_node for nodes in range(min_nodes, max_nodes + 1)]


def torchrun_args(args: argparse.Namespace) -> List[str]:
    """The argument list for torch.distributed.run that starts `python -m distrain train` on every worker."""
    out = ["--nproc-per-node", str(args.nproc_per_node), "--nnodes", str(args.nnodes),
           "--max-restarts", str(args.max_restarts), "--monitor-interval", str(args.monitor_interval)]
    multi_node = args.rdzv_endpoint is not None or str(args.nnodes) != "1"
    if multi_node:
        if args.rdzv_endpoint is None:
            raise UsageError(f"--nnodes {args.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node), so "
                             f"the nodes can find each other.")
        out += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint, "--rdzv-id", args.rdzv_id]
        conf = [f"join_timeout={args.join_timeout}"]
        if args.node_rank is not None:
            # Node 0 hosts the rendezvous store at --rdzv-endpoint. torch guesses that from the host name, which
            # fails when the endpoint is an address the name does not resolve to (containers, namespaces, NAT).
            # (c10d assigns the ranks itself: torchrun's own --node-rank would only be ignored, with a warning.)
            conf.append(f"is_host={'true' if args.node_rank == 0 else 'false'}")
        out += ["--rdzv-conf", ",".join(conf)]
        if getattr(args, "local_addr", None):
            out += ["--local-addr", args.local_addr]  # the workers' MASTER_ADDR when this node is rank 0
    else:
        out += ["--standalone"]  # one node: a private rendezvous on a free port, nothing to configure
    return out + ["--module", "distrain", "train", args.config, *args.overrides]


def _message(failure: Any) -> str:
    message = failure.message
    return (message if isinstance(message, str) else message.get("message", "")) or ""


def root_cause(failures: Dict[int, Any]) -> Tuple[int, Any]:
    """The failed worker that most likely caused the others to fail: (global rank, torchelastic ProcessFailure).

    torchelastic orders failures by a whole-second timestamp, taken from the error file or, without one, from
    when the agent noticed - so a rank killed by SIGKILL can look later than the peer that lost it. Hence, in
    order: not a worker the agent terminated (SIGTERM, no error file) while tearing the group down; not a
    DistributedError, which is a report about *other* ranks (a collective that lost or waited for a peer);
    then the earliest.
    """
    def key(item: Tuple[int, Any]) -> Tuple[bool, bool, int]:
        failure = item[1]
        reported = os.path.isfile(failure.error_file)  # it failed by itself, whatever ended the process after
        return (failure.exitcode == -signal.SIGTERM and not reported,
                _message(failure).startswith("DistributedError"), failure.timestamp)

    return min(failures.items(), key=key)


def cpu_oversubscription(nproc_per_node: int, cpus: int) -> Optional[str]:
    """A warning when a node starts far more workers than it has CPU cores (more than two per core), else None."""
    if nproc_per_node <= 2 * cpus:
        return None
    return (f"--nproc-per-node {nproc_per_node} starts {nproc_per_node} workers on {cpus} CPU core(s): each gets "
            f"a fraction of a core, so start-up and every step are slow and collectives may hit dist.timeout_s. "
            f"Use at most {2 * cpus} (or one per GPU).")


def check_rdzv_endpoint(endpoint: str) -> None:
    """Refuse an endpoint that cannot work, before torchrun's agent would wait on it for minutes.

    A port on this machine held by a program other than a distrain/torchrun agent (which is node 0's rendezvous
    when two "nodes" share a host) would make the agent retry a store that never answers.
    """
    host, _, port_text = endpoint.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"--rdzv-endpoint {endpoint!r} must be HOST:PORT, e.g. node0:29400 (the same on every node).")
    port = int(port_text)
    if is_local_host(host) and port_in_use(port):
        owner = port_owner(port)
        if owner is None or not _is_launcher(owner[1]):
            raise UsageError(f"--rdzv-endpoint {endpoint}: port {port} on this machine is already in use by "
                             f"{describe_owner(port)}, which is not a distrain or torchrun rendezvous, so the nodes "
                             f"could never meet there. Choose a free port, the same on every node (e.g. "
                             f"{free_port()} is free now; `distrain doctor` checks ports), or stop that process.")


def _is_launcher(cmdline: str) -> bool:
    """Whether a command line is `distrain launch` or torchrun: node 0's agent, whose store is meant to be there."""
    tokens = cmdline.split()
    names = [os.path.basename(t) for t in tokens]
    return ("torchrun" in names or "torch.distributed.run" in tokens
            or ("launch" in tokens and "distrain" in names))


def fill_from_environment(args: argparse.Namespace) -> None:
    """Flags the user left out take torchrun's PET_* variables (what a Kubeflow operator sets in a pod, and what
    torchrun itself would read), then the built-in defaults."""
    pet = torchrun_settings()
    for name, default in (("nnodes", "1"), ("nproc_per_node", 1), ("node_rank", None), ("rdzv_endpoint", None),
                          ("rdzv_id", "distrain"), ("max_restarts", 0)):
        if getattr(args, name, None) is None:
            value = getattr(pet, name)
            setattr(args, name, default if value is None else value)


def _check_args(args: argparse.Namespace) -> None:
    """The launcher's own numbers, refused in one paragraph (a UsageError) when out of range."""
    if args.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node {args.nproc_per_node} is not allowed: it must be at least 1 "
                         f"(the number of worker processes on this node).")
    if args.max_restarts < 0:
        raise UsageError(f"--max-restarts {args.max_restarts} is not allowed: it must be 0 or more.")
    if args.join_timeout < 1:
        raise UsageError(f"--join-timeout {args.join_timeout} is not allowed: it must be at least 1 (seconds).")


def _set_worker_environment(nproc_per_node: int) -> None:
    """Environment the agent's workers inherit (a caller's own settings win)."""
    # The agent's rendezvous store outlives a restart, and with it the workers' process-group keys of the failed
    # attempt: a restarted rank can read a dead peer's address and fail to connect (pytorch/pytorch#135712).
    # Not sharing it gives every attempt a fresh store, hosted by the new rank 0.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # torchrun would warn and pin 1 thread; share this node's cores between its workers instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc_per_node)))
    # The agent runs in this process and spawns the workers: each ends with it (distrain train reads this), so a
    # launcher killed with -9 leaves no worker training on as an orphan.
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())


def launch(args: argparse.Namespace) -> int:
    """Check the config against the job's world size, then run torchrun's agent in this process."""
    from distrain.preflight import check_job  # lazy: start-up: pulls in torch, which this module does without

    fill_from_environment(args)
    _check_args(args)
    worlds = _world_sizes(args)
    if args.rdzv_endpoint is not None:
        check_rdzv_endpoint(args.rdzv_endpoint)
    warning = cpu_oversubscription(args.nproc_per_node, available_cpus())
    if warning:
        print(f"distrain: warning: {warning}", file=sys.stderr)
    cfg = load_config(args.config, args.overrides)
    check_job(cfg, worlds)  # fail here, once, not in every worker; an elastic range at each of its sizes
    import torch  # lazy: start-up: torch takes seconds to import

    from distrain.dist import check_gpus_per_node  # lazy: start-up: pulls in torch, which this module does without

    check_gpus_per_node(args.nproc_per_node, torch.cuda.device_count(), cfg.dist.backend, cfg.dist.device)

    from torch.distributed import run as torchrun  # lazy: start-up: torch takes seconds to import
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError, RendezvousTimeoutError

    _set_worker_environment(args.nproc_per_node)
    parsed = torchrun.get_args_parser().parse_args(torchrun_args(args))
    multi_node = parsed.rdzv_backend == "c10d" and not parsed.standalone
    waiting = WaitingForNodes(str(args.nnodes), args.rdzv_endpoint, args.join_timeout,
                              hosts_store=args.node_rank in (None, 0)) if multi_node else None
    try:
        with waiting or contextlib.nullcontext():
            torchrun.run(parsed)
    except RendezvousTimeoutError as err:
        raise DistributedError(timeout_message(str(args.nnodes), args.rdzv_endpoint, args.join_timeout,
                                               args.node_rank, str(err))) from None
    except RendezvousError as err:  # e.g. node 0's store never answered a node that is not the host
        raise DistributedError(f"The rendezvous at {args.rdzv_endpoint} failed: {' '.join(str(err).split())[:300]}. "
                               f"Check that node 0 (--node-rank 0) runs `distrain launch` with the same "
                               f"--rdzv-endpoint, and that the address is reachable from this node.") from None
    except ChildFailedError as err:
        codes = {failure.exitcode for failure in err.failures.values()}
        first_rank, first = root_cause(err.failures)
        detail = _message(first).strip().splitlines()
        print(f"distrain: error: worker rank {first_rank} failed first (exit code {first.exitcode}"
              f"{', ' + detail[-1] if detail else ''}); {len(err.failures)} rank(s) failed in all. Each rank's log "
              f"is in <run dir>/logs/rank<N>.log.", file=sys.stderr)
        return 2 if codes == {2} else 1
    except SignalException as err:
        # The agent forwarded the signal to the workers, which (faults.signals) commit a checkpoint and stop.
        print(f"distrain: launch stopped by {signal.Signals(err.sigval).name}; the workers were asked to checkpoint "
              f"and stop. Run the same command again to resume.", file=sys.stderr)
        return 128 + int(err.sigval)
    except DistrainError:
        raise
    return 0
