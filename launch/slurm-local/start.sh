#!/usr/bin/env bash
# Turn this single host into a real SLURM cluster (slurmctld + N slurmd) for tests.
#
#   launch/slurm-local/start.sh                        # one node named $(hostname)
#   DISTRAIN_SLURM_NODES=2 launch/slurm-local/start.sh # virtual nodes n1, n2 on this host
#   launch/slurm-local/stop.sh                         # tear it all down again
#
# Environment:
#   DISTRAIN_SLURM_DIR    state dir (slurm.conf, logs, spool, pids); default /tmp/distrain-slurm
#   DISTRAIN_SLURM_NODES  number of virtual nodes; default 1
#   DISTRAIN_SLURM_WAIT   seconds to wait for all nodes to be idle; default 60
#
# Needs root (apt-get, /etc/hosts, daemons run as SlurmUser=root). Built for
# Debian 12's slurm 22.05 in a container without systemd: daemons are started by
# hand because PID 1 is not systemd and policy-rc.d stops the packages doing it.
# Idempotent: if the same cluster is already up and healthy, exits 0 at once.
#
# Client commands find the cluster through /etc/slurm/slurm.conf, which is made a
# symlink to the generated file (only if that path is free or already a symlink);
# otherwise `source $DISTRAIN_SLURM_DIR/env.sh` to export SLURM_CONF.
set -euo pipefail

STATE_DIR=${DISTRAIN_SLURM_DIR:-/tmp/distrain-slurm}
NODES=${DISTRAIN_SLURM_NODES:-1}
WAIT_S=${DISTRAIN_SLURM_WAIT:-60}
CONF=$STATE_DIR/slurm.conf
MARKER=$STATE_DIR/.distrain-slurm   # tells stop.sh this dir is ours to delete
HOSTS_TAG="# distrain-slurm-local"   # tags the /etc/hosts line we add (and remove on stop)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

log() { echo "[slurm-local] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- sanity checks
[[ $(id -u) == 0 ]] || die "must run as root (installs packages, starts daemons as SlurmUser=root)"
[[ $NODES =~ ^[1-9][0-9]*$ && $NODES -le 64 ]] || die "DISTRAIN_SLURM_NODES must be 1..64, got '$NODES'"
[[ $WAIT_S =~ ^[1-9][0-9]*$ ]] || die "DISTRAIN_SLURM_WAIT must be a positive integer, got '$WAIT_S'"
[[ $STATE_DIR == /* && $STATE_DIR != / ]] || die "DISTRAIN_SLURM_DIR must be an absolute path other than /, got '$STATE_DIR'"

HOST=$(hostname -s)
if (( NODES == 1 )); then
    # A single node keeps the real hostname, so SLURMD_NODENAME / SLURM_JOB_NODELIST
    # name a host that resolves without any /etc/hosts help.
    NODE_NAMES=("$HOST")
else
    NODE_NAMES=()
    for ((k = 1; k <= NODES; k++)); do NODE_NAMES+=("n$k"); done
fi

export SLURM_CONF=$CONF   # all client commands below talk to *this* cluster

# shellcheck source=launch/slurm-local/pids.sh
source "$(dirname "${BASH_SOURCE[0]}")/pids.sh"

# Node names as sinfo reports them, sorted, one per line.
current_nodes() { timeout 5 sinfo -h -N -o '%N' 2>/dev/null | sort -u; }
expected_nodes() { printf '%s\n' "${NODE_NAMES[@]}" | sort -u; }

# True when every expected node is up and usable. "idle" is what a fresh cluster
# shows; mixed/allocated/completing just mean jobs are running, which is healthy.
all_nodes_ok() {
    local want=${1:-usable} states
    [[ "$(current_nodes)" == "$(expected_nodes)" ]] || return 1
    states=$(timeout 5 sinfo -h -N -o '%T' 2>/dev/null) || return 1
    [[ -n $states ]] || return 1
    local ok='^(idle|mixed|allocated|completing)$'
    [[ $want == idle ]] && ok='^idle$'
    # Any line that is not an OK state means "not (yet) healthy".
    if grep -Eqv "$ok" <<<"$states"; then return 1; fi
    return 0
}

# ------------------------------------------------------- already running? (idempotent)
# slurmctld notices a dead slurmd only after SlurmdTimeout (minutes), so check
# each daemon's PID ourselves too.
daemons_alive() {
    local node
    pid_alive "$(pid_from "$STATE_DIR/slurmctld.pid")" || return 1
    for node in "${NODE_NAMES[@]}"; do
        pid_alive "$(pid_from "$STATE_DIR/slurmd-$node.pid")" || return 1
    done
}

CTLD_PID=$(pid_from "$STATE_DIR/slurmctld.pid")
if pid_alive "$CTLD_PID" && [[ -f $CONF ]]; then
    if daemons_alive && all_nodes_ok usable; then
        log "already running and healthy (nodes: $(current_nodes | paste -sd, -)); nothing to do"
        exit 0
    fi
    running=$(current_nodes | paste -sd, -)
    want=$(expected_nodes | paste -sd, -)
    if [[ -n $running && $running != "$want" ]]; then
        die "a cluster with nodes [$running] is already running from $STATE_DIR, but [$want] was asked for; run $HERE/stop.sh first"
    fi
    log "found a partially running cluster in $STATE_DIR; restarting it"
fi
# Anything left over (dead controller, orphan slurmd, stale files) is cleared
# by stop.sh, which is safe to run when nothing is up.
if [[ -e $STATE_DIR ]]; then
    DISTRAIN_SLURM_DIR=$STATE_DIR "$HERE/stop.sh" >&2 || die "could not clean up the previous cluster in $STATE_DIR"
fi

# ---------------------------------------------------------------- install packages
need_install=0
for bin in slurmctld slurmd sinfo srun sbatch scontrol munged munge; do
    command -v "$bin" >/dev/null 2>&1 || need_install=1
done
if (( need_install )); then
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # dpkg is chatty (and policy-rc.d "denied execution" lines are expected):
    # keep its output in a log and show it only on failure.
    apt_log=$(mktemp /tmp/distrain-slurm-apt.XXXXXX.log)
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
            slurmctld slurmd slurm-client munge; } >"$apt_log" 2>&1; then
        tail -n 30 "$apt_log" >&2
        die "apt-get install of slurmctld slurmd slurm-client munge failed (full log: $apt_log)"
    fi
    rm -f "$apt_log"
fi

# ---------------------------------------------------------------- state dir + slurm.conf
mkdir -p "$STATE_DIR"/{log,ctld,spool}
touch "$MARKER"

# Hardware line from slurmd itself, so the node never registers with fewer
# CPUs/memory than configured (which would drain it). Drop the NodeName field:
# we name nodes ourselves. UpTime is on a second line and is not a config key.
NODE_HW=$(slurmd -C | head -n1 | sed -E 's/^NodeName=[^ ]+ *//')
[[ $NODE_HW == *CPUs=* ]] || die "could not read the node's hardware from 'slurmd -C' (got: $NODE_HW)"

{
    echo "# Generated by $HERE/start.sh - a throwaway single-host cluster for distrain tests."
    echo "ClusterName=distrain"
    # Name and address of the controller: the address avoids depending on DNS.
    echo "SlurmctldHost=$HOST(127.0.0.1)"
    echo "AuthType=auth/munge"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "StateSaveLocation=$STATE_DIR/ctld"
    # %n: one spool/pid/log per virtual node, or the slurmds trample each other.
    echo "SlurmdSpoolDir=$STATE_DIR/spool/%n"
    echo "SlurmctldPidFile=$STATE_DIR/slurmctld.pid"
    echo "SlurmdPidFile=$STATE_DIR/slurmd-%n.pid"
    echo "SlurmctldLogFile=$STATE_DIR/log/slurmctld.log"
    echo "SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log"
    # No cgroups in this container: track processes through /proc, no task binding.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "MpiDefault=none"
    echo "SchedulerType=sched/backfill"
    # Without MailProg slurmctld complains about a missing /usr/bin/mail.
    echo "MailProg=/bin/true"
    # A node that was down comes back by itself once its slurmd registers.
    echo "ReturnToService=2"
    # Seconds between SIGTERM and SIGKILL on cancel/timeout: room for a checkpoint.
    echo "KillWait=10"
    echo "InactiveLimit=0"
    echo "MinJobAge=300"
    echo "SlurmctldDebug=info"
    echo "SlurmdDebug=info"
    if (( NODES == 1 )); then
        echo "NodeName=$HOST NodeAddr=127.0.0.1 $NODE_HW State=UNKNOWN"
    else
        # Virtual nodes: same host, same address, one slurmd port each.
        for ((k = 1; k <= NODES; k++)); do
            echo "NodeName=n$k NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((17000 + k)) $NODE_HW State=UNKNOWN"
        done
    fi
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
} >"$CONF"

echo "export SLURM_CONF=$CONF" >"$STATE_DIR/env.sh"

# Let client commands find the cluster without SLURM_CONF, unless an admin's
# real slurm.conf lives there (then we leave it alone and say so).
if [[ ! -e /etc/slurm/slurm.conf || -L /etc/slurm/slurm.conf ]]; then
    mkdir -p /etc/slurm
    ln -sfn "$CONF" /etc/slurm/slurm.conf
else
    log "note: /etc/slurm/slurm.conf is a real file; use 'source $STATE_DIR/env.sh' for client commands"
fi

# Virtual node names must resolve: srun and rendezvous code look them up. Edit
# /etc/hosts in place (cat >) rather than by rename, it is often a bind mount.
if (( NODES > 1 )); then
    tmp=$(mktemp)
    grep -v -- "$HOSTS_TAG" /etc/hosts >"$tmp" || true
    echo "127.0.0.1 ${NODE_NAMES[*]} $HOSTS_TAG" >>"$tmp"
    cat "$tmp" >/etc/hosts
    rm -f "$tmp"
fi

# ---------------------------------------------------------------- munge
# The package creates /etc/munge/munge.key; make one if it is missing.
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
fi
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged || die "munged failed to start (see /var/log/munge/munged.log)"
    # Remember that we started it, so stop.sh kills only a munged it owns.
    for _ in $(seq 50); do
        [[ -s /run/munge/munged.pid ]] && break
        sleep 0.1
    done
    pid_from /run/munge/munged.pid >"$STATE_DIR/munged.pid"
fi
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

# ---------------------------------------------------------------- ports
# A listener on our ports (another SLURM, a leftover process) makes a daemon
# die at bind time with only a log line: say so clearly up front.
ports=(6817)
if (( NODES == 1 )); then ports+=(6818); else for ((k = 1; k <= NODES; k++)); do ports+=($((17000 + k))); done; fi
for port in "${ports[@]}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "TCP port $port is already in use on this host (another slurmctld/slurmd?); free it first"
    fi
done

# ---------------------------------------------------------------- daemons
# The daemons fork into the background; their PIDs come from their pidfiles.
for node in "${NODE_NAMES[@]}"; do mkdir -p "$STATE_DIR/spool/$node"; done
t0=$SECONDS
slurmctld -f "$CONF" || die "slurmctld failed to start; see $STATE_DIR/log/slurmctld.log"
for node in "${NODE_NAMES[@]}"; do
    # -N: which NodeName line this slurmd is (the host name for a single node).
    slurmd -f "$CONF" -N "$node" || die "slurmd -N $node failed to start; see $STATE_DIR/log/slurmd-$node.log"
done

fail() {
    log "$1; sinfo says:"
    if pid_alive "$(pid_from "$STATE_DIR/slurmctld.pid")"; then
        timeout 5 sinfo -N -l >&2 || true
        timeout 5 sinfo -R >&2 || true
    else
        log "(slurmctld is not running)"
    fi
    local f
    for f in "$STATE_DIR"/log/*.log; do
        [[ -f $f ]] || continue
        log "--- tail of $f"
        tail -n 15 "$f" >&2
    done
    die "SLURM did not start (logs kept in $STATE_DIR/log; $HERE/stop.sh or the next start.sh cleans up)"
}

# ---------------------------------------------------------------- wait for idle
deadline=$((SECONDS + WAIT_S))
while :; do
    # A daemon that died (port taken, bad config) will never come up: fail now
    # instead of waiting out the deadline. Pidfiles appear shortly after start.
    if (( SECONDS - t0 >= 3 )) && ! daemons_alive; then
        fail "a SLURM daemon exited during startup"
    fi
    all_nodes_ok idle && break
    (( SECONDS < deadline )) || fail "nodes did not become idle within ${WAIT_S}s"
    sleep 0.2
done
log "cluster up in $((SECONDS - t0))s: $(sinfo -h -o '%P %a %D nodes %T %N' | paste -sd';' -)"
log "state dir: $STATE_DIR (SLURM_CONF=$CONF)"
