#!/usr/bin/env bash
# One node of a (multi-node) job under plain torchrun: run the same line on every node.
#
#   # node 0 (its address, 10.0.0.1, is the rendezvous endpoint):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh configs/gpt.yaml
#   # node 1:
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun.sh configs/gpt.yaml
#
# Every worker runs `python -m distrain train CONFIG [key=value ...]` and reads its rank, world size and master
# from torchrun's variables; the whole job sees the same config. `distrain launch --nnodes 2 --node-rank R
# --rdzv-endpoint HOST:PORT` does the same and checks the config for the whole world first (docs/clusters.md).
#
# Environment:
#   NNODES          nodes in the job (default 1)
#   NODE_RANK       this node, 0..NNODES-1; node 0 hosts the rendezvous store (default 0)
#   NPROC_PER_NODE  workers on this node (default: the GPUs nvidia-smi lists, else 1)
#   MASTER_ADDR     node 0's address, reachable from every node (default 127.0.0.1)
#   MASTER_PORT     rendezvous port on node 0 (default 29400)
#   LOCAL_ADDR      this node's address as the others reach it, if its host name does not resolve to it
#   RDZV_ID         job id shared by all nodes (default distrain)
#   MAX_RESTARTS    restart the worker group up to this many times after a failure (default 0)
#   DISTRAIN_PYTHON interpreter (default python)
# Multi-homed nodes: set NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME to the interface the nodes share.
set -euo pipefail

PY=${DISTRAIN_PYTHON:-python}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
if [[ -z ${NPROC_PER_NODE:-} ]]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    ((NPROC_PER_NODE > 0)) || NPROC_PER_NODE=1
fi
CONFIG=${1:?usage: launch/torchrun.sh CONFIG [key=value ...]}
shift

args=(--nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" --max-restarts "${MAX_RESTARTS:-0}"
      --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29400}"
      --rdzv-id "${RDZV_ID:-distrain}"
      # torch guesses which node hosts the store from its host name; say it outright.
      --rdzv-conf "is_host=$([[ $NODE_RANK == 0 ]] && echo true || echo false)")
[[ -n ${LOCAL_ADDR:-} ]] && args+=(--local-addr "$LOCAL_ADDR")
# A fresh store per attempt: with torch's shared rendezvous store a restarted rank can read the failed
# attempt's process-group keys and dial a dead peer (pytorch/pytorch#135712). `distrain launch` does the same.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}

exec "$PY" -m torch.distributed.run "${args[@]}" -m distrain train "$CONFIG" "$@"
