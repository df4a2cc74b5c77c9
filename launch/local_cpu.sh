#!/usr/bin/env bash
# Train on this machine with CPU workers (gloo): the quickstart on 2 workers unless told otherwise.
#
#   launch/local_cpu.sh                                   # configs/quickstart.yaml, 2 workers
#   launch/local_cpu.sh configs/mlp.yaml train.steps=50   # any config, any key=value overrides
#   NPROC=3 MAX_RESTARTS=2 launch/local_cpu.sh            # 3 workers; restart the group up to twice
#
# A thin wrapper over `distrain launch` (torch's elastic launcher): every worker runs `distrain train`, finds
# its rank from torchrun's variables, and resumes from the run's latest checkpoint after a restart.
#
# Environment: NPROC (workers, default 2), MAX_RESTARTS (default 0), DISTRAIN_PYTHON (interpreter; default
# the repo's .venv if there is one, else `python`).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${DISTRAIN_PYTHON:-} ]]; then
    PY=$DISTRAIN_PYTHON
elif [[ -x $REPO/.venv/bin/python ]]; then
    PY=$REPO/.venv/bin/python
else
    PY=python
fi

# First argument is the config unless it is already a key=value override.
CONFIG=$REPO/configs/quickstart.yaml
if (($#)) && [[ $1 != *=* ]]; then
    CONFIG=$1
    shift
fi

exec "$PY" -m distrain launch --nproc-per-node "${NPROC:-2}" --max-restarts "${MAX_RESTARTS:-0}" "$CONFIG" "$@"
