#!/usr/bin/env bash
# scripts/slurm.sh — run a real single-node Slurm cluster on this machine.
#
#   bash scripts/slurm.sh up      install (if needed), configure and start Slurm
#   bash scripts/slurm.sh down    cancel jobs and stop slurmd, slurmctld, munged
#   bash scripts/slurm.sh status  exit 0 if a node is usable, 1 otherwise
#
# Uses Debian's slurm-wlm (22.05) + munge, no systemd: the daemons are started
# directly (slurmctld/slurmd as root, munged as user munge). All Slurm state,
# logs and pid files live under $SLURM_STATE_DIR (default /tmp/slurmctl-slurm);
# munge keeps its Debian paths (/etc/munge, /run/munge, /var/log/munge).
# Every command is idempotent; `up` after `down` (or after a crash) works.
# `up` does not touch a cluster that already answers: after changing this
# file's slurm.conf, run `down` then `up`.
#
# Why the non-obvious settings:
#   SlurmUser=root          slurmctld runs as root; no "slurm" user/dir setup.
#   SlurmctldHost=H(127.0.0.1), NodeAddr=127.0.0.1
#                           everything talks over loopback, whatever the
#                           hostname resolves to.
#   ProctrackType=proctrack/linuxproc, TaskPlugin=task/none, no cgroup.conf
#                           no cgroup setup needed (writing a cgroup.conf with
#                           CgroupPlugin=disabled makes slurmd fail).
#   SelectType=select/cons_tres + CR_Core_Memory
#                           per-core/per-memory allocation, so several small
#                           jobs (dask-jobqueue workers: --mem=1G -c 1) share
#                           the node.
#   DefMemPerCPU            without it a job that does not ask for memory gets
#                           the whole node's memory and jobs run one by one.
#   OverSubscribe=FORCE:4   up to 4 jobs per core, so a 2-core CI machine can
#                           run more than 2 jobs at once.
#   ReturnToService=2       a node that went DOWN (e.g. slurmd restart) comes
#                           back by itself when its slurmd registers again.
#   RealMemory/CPUs         capped to what the machine has, else slurmd's
#                           registration fails and the node is drained.
#   SlurmdTimeout/InactiveLimit/KillWait/MinJobAge
#                           short values: fast recovery and fast cleanup in CI.
set -euo pipefail

STATE_DIR="${SLURM_STATE_DIR:-/tmp/slurmctl-slurm}"
CONF=/etc/slurm/slurm.conf
MARKER="$STATE_DIR/started-by-script"
LOG_DIR="$STATE_DIR/log"
RUN_DIR="$STATE_DIR/run"
CTLD_STATE="$STATE_DIR/state"
SPOOL="$STATE_DIR/spool"
CTLD_PID="$RUN_DIR/slurmctld.pid"
SLURMD_PID="$RUN_DIR/slurmd.pid"
MUNGE_KEY=/etc/munge/munge.key
MUNGE_RUN=/run/munge
MUNGE_PID="$MUNGE_RUN/munged.pid"
WAIT_SECS="${SLURM_WAIT_SECS:-60}"

log() { echo "slurm: $*"; }
die() { echo "slurm: ERROR: $*" >&2; exit 1; }

# sinfo -o %T prints e.g. idle, mixed, down, drained; a trailing "*" means
# "not responding" (never counted as usable). sinfo retries for ~10 s when no
# slurmctld answers, so it is only asked when a slurmctld process exists.
node_states() {
    command -v sinfo >/dev/null 2>&1 && running slurmctld "$CTLD_PID" || return 0
    timeout 10 sinfo -h -o %T 2>/dev/null || true
}
# Node state(s) on one line, for messages.
states_line() { node_states | paste -sd' ' -; }

# Usable = both Slurm daemons alive here (slurmctld notices a dead slurmd only
# after SlurmdTimeout) and the node in a state that takes jobs.
usable() {
    running slurmd "$SLURMD_PID" || return 1
    node_states | grep -Eq '^(idle|mixed|allocated|completing)$'
}

# True if pid exists and is not a zombie. (Here PID 1 reaps dead daemons
# only after a second or two; a zombie must not count as running.)
alive() {
    local st
    st=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]]
}

# Live pid of daemon $1: from pid file $2 if valid, else by exact name.
pids_of() {
    local name=$1 pidfile=$2 pid
    if [[ -n $pidfile && -s $pidfile ]]; then
        pid=$(cat "$pidfile" 2>/dev/null)  # the daemon may remove it as it exits, after the test above
        if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" \
            && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
            echo "$pid"; return 0
        fi
    fi
    for pid in $(pgrep -x "$name"); do
        alive "$pid" && echo "$pid"
    done
    return 0
}
running() { [[ -n $(pids_of "$1" "$2") ]]; }

stop_daemon() {
    local name=$1 pidfile=$2 i
    local -a pids
    mapfile -t pids < <(pids_of "$name" "$pidfile")
    if ((${#pids[@]})); then
        log "stopping $name (${pids[*]})"
        kill "${pids[@]}" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            running "$name" "$pidfile" || break
            sleep 0.2
        done
        mapfile -t pids < <(pids_of "$name" "$pidfile")
        ((${#pids[@]} == 0)) || kill -9 "${pids[@]}" 2>/dev/null || true
    fi
    [[ -z $pidfile ]] || rm -f "$pidfile"
}

show_logs() {
    local f
    for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
        [[ -f $f ]] || continue
        echo "----- tail $f -----" >&2
        tail -n 30 "$f" >&2 || true
    done
    echo "----- sinfo -----" >&2
    timeout 10 sinfo -N -l >&2 2>&1 || true
}

fail() { echo "slurm: ERROR: $*" >&2; show_logs; exit 1; }

install_packages() {
    local missing=0 b
    for b in slurmctld slurmd munged sbatch sinfo mungekey; do
        command -v "$b" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    mkdir -p "$LOG_DIR"
    # --no-install-recommends: 9 packages instead of ~43 (HDF5, ROCm, IPMI,
    # InfluxDB plugins... none of which a local test cluster needs).
    if ! { apt-get update -qq &&
        apt-get install -y -qq --no-install-recommends slurm-wlm munge; } \
        >"$LOG_DIR/apt.log" 2>&1; then
        tail -n 30 "$LOG_DIR/apt.log" >&2
        die "apt-get failed (full log: $LOG_DIR/apt.log)"
    fi
}

setup_munge_key() {
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating munge key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        elif command -v create-munge-key >/dev/null 2>&1; then
            create-munge-key -f
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge "$MUNGE_KEY" 2>/dev/null || true
    chmod 400 "$MUNGE_KEY"
}

write_conf() {
    local host cpus mem_mb mem def_mem tmp
    host=$(hostname -s)
    cpus=$(nproc)
    # Leave ~10% for the OS, at most 8000 MB: slurmd drains the node if it
    # has less memory than configured.
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
    mem=$((mem_mb * 9 / 10))
    ((mem <= 8000)) || mem=8000
    def_mem=$((mem / cpus / 4))
    ((def_mem >= 100)) || def_mem=100
    ((def_mem <= 1000)) || def_mem=1000
    mkdir -p /etc/slurm
    tmp=$(mktemp)
    cat >"$tmp" <<EOF
# Written by scripts/slurm.sh (slurmctl): single-node test cluster.
ClusterName=local
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
SlurmUser=root
MpiDefault=none
MailProg=/bin/true
StateSaveLocation=${CTLD_STATE}
SlurmdSpoolDir=${SPOOL}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=${def_mem}
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=30
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    if ! cmp -s "$tmp" "$CONF"; then
        log "writing $CONF"
        install -m 644 "$tmp" "$CONF"
    fi
    rm -f "$tmp"
}

start_munge() {
    if running munged "$MUNGE_PID" && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return 0
    fi
    stop_daemon munged "$MUNGE_PID"
    mkdir -p "$MUNGE_RUN" /var/log/munge /var/lib/munge
    rm -f "$MUNGE_RUN"/munge.socket.2*  # stale socket/lock from a killed munged
    log "starting munged"
    # Run it as the munge user, as the packaged service does; munged refuses
    # files it does not own, so hand them back (a root-run munged may have
    # left root-owned ones). Fall back to root + --force if that fails.
    local err
    chown -R munge:munge "$MUNGE_RUN" /var/log/munge /var/lib/munge 2>/dev/null || true
    if ! err=$(runuser -u munge -- munged 2>&1); then
        log "munged as user munge failed ($err); starting it as root"
        munged --force || fail "munged did not start"
    fi
    local i
    for ((i = 0; i < 25; i++)); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    fail "munge credential round-trip failed"
}

start_slurmctld() {
    running slurmctld "$CTLD_PID" && return 0
    log "starting slurmctld"
    slurmctld || true
    sleep 1
    if ! running slurmctld "$CTLD_PID"; then
        # Most likely stale/incompatible saved state: drop it and start clean.
        log "slurmctld did not stay up; clearing saved state and retrying"
        rm -rf "${CTLD_STATE:?}"/*
        slurmctld -c || true
        sleep 1
        running slurmctld "$CTLD_PID" || fail "slurmctld did not start"
    fi
}

start_slurmd() {
    running slurmd "$SLURMD_PID" && return 0
    log "starting slurmd"
    slurmd || fail "slurmd did not start"
    sleep 0.5
    running slurmd "$SLURMD_PID" || fail "slurmd exited right after start"
}

wait_usable() {
    local host i states resumed=0
    host=$(hostname -s)
    for ((i = 0; i < WAIT_SECS * 2; i++)); do
        usable && return 0
        states=$(node_states)
        if ((!resumed)) && grep -Eq '^(down|drain|drained|draining|fail|failing)' <<<"$states"; then
            log "node is '$(paste -sd' ' - <<<"$states")', resuming it"
            scontrol update nodename="$host" state=resume 2>/dev/null || true
            resumed=1
        fi
        sleep 0.5
    done
    fail "no usable node after ${WAIT_SECS}s (sinfo: '$(states_line)')"
}

cmd_up() {
    local t0=$SECONDS started=0
    if usable; then
        log "already running"
        return 0
    fi
    install_packages
    mkdir -p "$LOG_DIR" "$RUN_DIR" "$CTLD_STATE" "$SPOOL"
    setup_munge_key
    write_conf
    running munged "$MUNGE_PID" && running slurmctld "$CTLD_PID" \
        && running slurmd "$SLURMD_PID" || started=1
    start_munge
    start_slurmctld
    start_slurmd
    ((started)) && date -u +%FT%TZ >"$MARKER"
    wait_usable
    log "up in $((SECONDS - t0))s: $(sinfo -h -o '%P %D %T %c cpus %m MB' | head -n1)"
}

cmd_down() {
    local i
    if command -v squeue >/dev/null 2>&1 && running slurmctld "$CTLD_PID"; then
        # As root this cancels every job; otherwise only our own.
        timeout 10 squeue -h -o %A 2>/dev/null | xargs -r scancel 2>/dev/null || true
        for ((i = 0; i < 30; i++)); do
            [[ -z $(timeout 5 squeue -h -o %A 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
    # Job step daemons left behind by a job that did not finish in time.
    stop_daemon slurmstepd ""
    stop_daemon munged "$MUNGE_PID"
    rm -f "$MARKER"
    log "stopped"
}

cmd_status() {
    if usable; then
        log "running ($(states_line))"
        return 0
    fi
    if running slurmctld "$CTLD_PID"; then
        log "not usable (node state: '$(states_line)'," \
            "slurmd $(running slurmd "$SLURMD_PID" && echo running || echo stopped))"
    else
        log "not running"
    fi
    return 1
}

export PATH="$PATH:/usr/sbin:/sbin"  # daemons live in /usr/sbin
# up/down need root (apt-get, and slurmctld/slurmd/munged run as root); status does not. Not root: re-run through
# `sudo -n` (never prompts, so CI cannot hang on a password), passing on this script's own settings.
if [[ $(id -u) -ne 0 && ${1:-} =~ ^(up|down)$ ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        exec sudo -n env SLURM_STATE_DIR="$STATE_DIR" SLURM_WAIT_SECS="$WAIT_SECS" bash "$0" "$@"
    fi
    die "'$1' needs root (apt-get install, and the Slurm and munge daemons run as root), and user" \
        "$(id -un) is not root and cannot use sudo without a password. Run it as root, e.g." \
        "\`sudo bash $0 $1\`, or give this user passwordless sudo (as CI runners have)."
fi

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
