# Process helpers shared by start.sh and stop.sh (sourced, not run).

# Alive = exists and is not a zombie: PID 1 here reaps daemonized processes
# late, and kill -0 succeeds on a zombie.
pid_alive() {
    local stat
    [[ -n ${1:-} ]] && kill -0 "$1" 2>/dev/null || return 1
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}
pid_from() { [[ -r $1 ]] && tr -dc '0-9' <"$1" || true; }
