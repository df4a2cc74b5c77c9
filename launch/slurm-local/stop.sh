#!/usr/bin/env bash
# Tear down the single-host SLURM cluster made by start.sh. Safe to run twice,
# and safe when nothing is running.
#
#   launch/slurm-local/stop.sh
#
# Environment: DISTRAIN_SLURM_DIR (state dir; default /tmp/distrain-slurm).
#
# Order matters: cancel jobs first (so no slurmstepd outlives the daemons), then
# `scontrol shutdown`, then wait on the daemons' PIDs. The daemons delete their
# pidfiles as soon as they get SIGTERM, so the PIDs are read *before* shutdown.
set -uo pipefail   # no -e: keep cleaning up even when one step fails

STATE_DIR=${DISTRAIN_SLURM_DIR:-/tmp/distrain-slurm}
CONF=$STATE_DIR/slurm.conf
MARKER=$STATE_DIR/.distrain-slurm
HOSTS_TAG="# distrain-slurm-local"

log() { echo "[slurm-local] $*" >&2; }

[[ $STATE_DIR == /* && $STATE_DIR != / ]] || { log "ERROR: DISTRAIN_SLURM_DIR must be an absolute path other than /, got '$STATE_DIR'"; exit 1; }
[[ $(id -u) == 0 ]] || { log "ERROR: must run as root"; exit 1; }

export SLURM_CONF=$CONF

# shellcheck source=launch/slurm-local/pids.sh
source "$(dirname "${BASH_SOURCE[0]}")/pids.sh"

# Wait until none of the given PIDs is alive, up to $1 seconds. Returns 1 on timeout.
wait_pids() {
    local limit=$1 pid alive
    shift
    local deadline=$((SECONDS + limit))
    while :; do
        alive=0
        for pid in "$@"; do pid_alive "$pid" && alive=1; done
        (( alive )) || return 0
        (( SECONDS < deadline )) || return 1
        sleep 0.1
    done
}

# PIDs of slurmctld/slurmd processes started with *our* slurm.conf (-f $CONF).
# This backs up the pidfiles (e.g. after a crash) without matching any other
# cluster's daemons by name.
our_daemon_pids() {
    local d cmd
    for d in /proc/[0-9]*; do
        cmd=$(tr '\0' ' ' <"$d/cmdline" 2>/dev/null) || continue
        [[ $cmd == slurmctld\ * || $cmd == slurmd\ * || $cmd == */slurmctld\ * || $cmd == */slurmd\ * ]] || continue
        [[ $cmd == *" -f $CONF "* ]] && echo "${d#/proc/}"
    done
}

t0=$(date +%s.%N)

# ---------------------------------------------------------------- collect PIDs first
pids=()
for f in "$STATE_DIR"/slurmctld.pid "$STATE_DIR"/slurmd-*.pid; do
    [[ -e $f ]] || continue
    p=$(pid_from "$f")
    pid_alive "$p" && pids+=("$p")
done
while read -r p; do
    [[ -n $p ]] && pid_alive "$p" && [[ " ${pids[*]} " != *" $p "* ]] && pids+=("$p")
done < <(our_daemon_pids)

graceful=0
CTLD_PID=$(pid_from "$STATE_DIR/slurmctld.pid")
if pid_alive "$CTLD_PID" && command -v scontrol >/dev/null 2>&1; then
    # ------------------------------------------------------------ cancel jobs
    jobs=$(timeout 10 squeue -h -o '%A' 2>/dev/null | sort -u)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: $(paste -sd' ' <<<"$jobs")"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        # Tasks get SIGTERM, then SIGKILL after KillWait (10 s): wait a bit longer.
        deadline=$((SECONDS + 20))
        while [[ -n $(timeout 10 squeue -h -o '%A' 2>/dev/null) ]] && (( SECONDS < deadline )); do
            sleep 0.2
        done
    fi
    # ------------------------------------------------------------ shutdown
    # Stops slurmctld and every registered slurmd.
    if timeout 15 scontrol shutdown >/dev/null 2>&1; then
        graceful=1
    else
        log "scontrol shutdown failed; signalling the daemons directly"
    fi
fi

# After a successful shutdown the daemons exit by themselves within seconds;
# otherwise (dead controller, orphan slurmd) signal them straight away.
if ((${#pids[@]})) && ! { (( graceful )) && wait_pids 15 "${pids[@]}"; }; then
    (( graceful )) && log "daemons still alive after 15 s; sending SIGTERM"
    for p in "${pids[@]}"; do pid_alive "$p" && kill -TERM "$p" 2>/dev/null; done
    if ! wait_pids 10 "${pids[@]}"; then
        log "still alive; sending SIGKILL"
        for p in "${pids[@]}"; do pid_alive "$p" && kill -KILL "$p" 2>/dev/null; done
        wait_pids 5 "${pids[@]}" || log "WARNING: could not stop PIDs: ${pids[*]}"
    fi
fi

# ---------------------------------------------------------------- munged
# Only a munged that start.sh launched (it wrote its PID into the state dir).
MUNGE_PID=$(pid_from "$STATE_DIR/munged.pid")
if pid_alive "$MUNGE_PID" && [[ $(tr '\0' ' ' <"/proc/$MUNGE_PID/cmdline" 2>/dev/null) == *munged* ]]; then
    kill -TERM "$MUNGE_PID" 2>/dev/null
    wait_pids 10 "$MUNGE_PID" || { kill -KILL "$MUNGE_PID" 2>/dev/null; wait_pids 5 "$MUNGE_PID"; }
fi

# ---------------------------------------------------------------- clean state
# /etc/hosts: drop the line start.sh tagged. Rewrite in place (it may be a bind mount).
if grep -q -- "$HOSTS_TAG" /etc/hosts 2>/dev/null; then
    tmp=$(mktemp)
    grep -v -- "$HOSTS_TAG" /etc/hosts >"$tmp"
    cat "$tmp" >/etc/hosts
    rm -f "$tmp"
fi
# The client symlink, but only if it points at our conf.
if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$CONF" ]]; then
    rm -f /etc/slurm/slurm.conf
fi
# The state dir, but only if start.sh made it (marker), never an arbitrary path.
if [[ -d $STATE_DIR ]]; then
    if [[ -e $MARKER ]]; then
        rm -rf -- "$STATE_DIR"
    else
        log "WARNING: $STATE_DIR has no $(basename "$MARKER") marker; not deleting it"
    fi
fi

log "stopped in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')s"
exit 0
