"""`distrain launch`: N workers per node through torch's elastic launcher (see distrain.launch.torchrun)."""

from __future__ import annotations

import argparse

from distrain.commands import add_config_arguments
from distrain.launch.rendezvous import DEFAULT_JOIN_TIMEOUT_S


def register(sub) -> None:
    p = sub.add_parser("launch", help="start N workers per node with torch's elastic launcher, then train")
    # Flags left out take torchrun's PET_* variables (set by Kubeflow in a pod), then the defaults shown.
    p.add_argument("--nproc-per-node", type=int, default=None, metavar="N",
                   help="workers on this node (default $PET_NPROC_PER_NODE, else 1)")
    p.add_argument("--nnodes", default=None, metavar="N|MIN:MAX", help="number of nodes (default $PET_NNODES, else 1)")
    p.add_argument("--node-rank", type=int, default=None, metavar="R", help="this node's rank; node 0 hosts the rendezvous store at --rdzv-endpoint")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT",
                   help="c10d rendezvous address (multi-node; default $PET_RDZV_ENDPOINT or "
                        "$PET_MASTER_ADDR:$PET_MASTER_PORT)")
    p.add_argument("--rdzv-id", default=None, help="job id shared by all nodes (default $PET_RDZV_ID, else distrain)")
    p.add_argument("--local-addr", default=None, metavar="ADDR",
                   help="this node's address as the other nodes reach it (multi-node; default: its host name)")
    p.add_argument("--join-timeout", type=int, default=DEFAULT_JOIN_TIMEOUT_S, metavar="SECONDS",
                   help=f"multi-node: how long this node waits for the others at --rdzv-endpoint (default "
                        f"{DEFAULT_JOIN_TIMEOUT_S})")
    p.add_argument("--max-restarts", type=int, default=None, metavar="K",
                   help="restart the worker group up to K times after a failure (resumes from the latest checkpoint; "
                        "default $PET_MAX_RESTARTS, else 0)")
    p.add_argument("--monitor-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    add_config_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.launch.torchrun import launch

    return launch(args)
