#!/usr/bin/env bash
# Start a single-node Slurm cluster for the xvr_batch tests (Debian 12, run as root, no systemd).
#
#   bash tests/cluster/start-slurm.sh
#
# What it does, each step only when needed (a second run on a healthy cluster changes nothing):
#   1. installs slurm-wlm and munge with apt-get if slurmctld is missing;
#   2. creates the munge key and starts munged as the munge user;
#   3. writes /etc/slurm/slurm.conf and gres.conf from slurm.conf.in and gres.conf.in next to this
#      script: one node named `hostname -s` with all its CPUs, 80 % of its memory and two fake GPUs
#      (character devices equal to /dev/null), in one partition `debug`;
#   4. starts slurmctld then slurmd, waits until the node is idle, and runs one `sbatch --wait` job.
# It ends with one summary line. tests/cluster/stop-slurm.sh stops the daemons again.
#
# Settings (environment): SLURM_CI_GPUS (fake GPUs, default 2), SLURM_CI_TIMEOUT (seconds to wait
# for the node to become idle, default 30).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
conf_dir=/etc/slurm
gpu_dir=/run/slurm/gpus
ngpus=${SLURM_CI_GPUS:-2}
idle_timeout=${SLURM_CI_TIMEOUT:-30}
host=$(hostname -s)
started=$(date +%s.%N)

log() { echo "start-slurm: $*" >&2; }
die() { echo "start-slurm: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs packages and starts daemons)"
[[ $ngpus =~ ^[1-9][0-9]*$ ]] || die "SLURM_CI_GPUS must be a positive integer, not '$ngpus'"

# --- 1. packages ---------------------------------------------------------------------------------
install_packages() {
    log "installing slurm-wlm and munge with apt-get"
    # Keep the packages' maintainer scripts from starting daemons with a default config:
    # this script starts them itself, once its config is written.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        own_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT  # even if apt-get is interrupted
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -q &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
                slurm-wlm munge
    } >/var/log/start-slurm-apt.log 2>&1 || rc=$?
    if [ "$own_policy" -eq 1 ]; then
        rm -f "$policy"
        trap - EXIT
    fi
    [ "$rc" -eq 0 ] || { tail -n 20 /var/log/start-slurm-apt.log >&2; die "apt-get failed (rc=$rc)"; }
}
command -v slurmctld >/dev/null 2>&1 || install_packages
for tool in slurmctld slurmd sinfo sbatch scontrol munged munge unmunge; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found after installing slurm-wlm and munge"
done

# --- 2. munge ------------------------------------------------------------------------------------
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    local i
    for i in $(seq 50); do munge_ok && return 0; sleep 0.1; done
    die "munged started but 'munge -n | unmunge' fails; see /var/log/munge/munged.log"
}
munge_ok || start_munge

# --- 3. configuration ----------------------------------------------------------------------------
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ { printf "%d", $2 * 0.8 / 1024 }' /proc/meminfo)
render() {  # render TEMPLATE: fill the @NAME@ placeholders
    sed -e "s|@HOST@|$host|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEM_MB@|$mem_mb|g" \
        -e "s|@NGPUS@|$ngpus|g" -e "s|@LAST_GPU@|$((ngpus - 1))|g" -e "s|@GPU_DIR@|$gpu_dir|g" "$1"
}
new_slurm_conf=$(render "$here/slurm.conf.in")
new_gres_conf=$(render "$here/gres.conf.in")
config_current() {
    [ -f "$conf_dir/slurm.conf" ] && [ -f "$conf_dir/gres.conf" ] &&
        [ "$(cat "$conf_dir/slurm.conf")" = "$new_slurm_conf" ] &&
        [ "$(cat "$conf_dir/gres.conf")" = "$new_gres_conf" ]
}

pid_alive() {  # pid_alive PIDFILE NAME: the pid file names a live process called NAME
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [[ $pid =~ ^[0-9]+$ ]] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
node_state() { sinfo -h -o %t 2>/dev/null | head -n 1; }
healthy() {
    pid_alive /run/slurm/slurmctld.pid slurmctld && pid_alive /run/slurm/slurmd.pid slurmd &&
        scontrol ping >/dev/null 2>&1 && [[ $(node_state) =~ ^(idle|mix|alloc)$ ]] &&
        [ -c "$gpu_dir/gpu$((ngpus - 1))" ]
}
summary() {
    local took
    took=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    echo "slurm: $1: node $host ($cpus CPUs, ${mem_mb} MB, gpu:$ngpus fake) partition debug," \
        "state $(node_state), $(sinfo -V 2>/dev/null || echo 'slurm ?'), ${took} s"
}

if config_current && healthy; then
    summary "already running"
    exit 0
fi

# Something is missing, stale or configured differently: (re)start both daemons from a clean slate.
bash "$here/stop-slurm.sh" >/dev/null

install -d -m 0755 "$conf_dir" /run/slurm /var/log/slurm /var/spool/slurmctld /var/spool/slurmd "$gpu_dir"
printf '%s\n' "$new_slurm_conf" >"$conf_dir/slurm.conf"
printf '%s\n' "$new_gres_conf" >"$conf_dir/gres.conf"
for ((i = 0; i < ngpus; i++)); do
    [ -c "$gpu_dir/gpu$i" ] || mknod -m 0666 "$gpu_dir/gpu$i" c 1 3
done

# --- 4. daemons ----------------------------------------------------------------------------------
log "starting slurmctld and slurmd"
/usr/sbin/slurmctld || die "slurmctld failed to start; see /var/log/slurm/slurmctld.log"
for _ in $(seq 50); do scontrol ping >/dev/null 2>&1 && break; sleep 0.1; done
/usr/sbin/slurmd || die "slurmd failed to start; see /var/log/slurm/slurmd.log"

deadline=$(($(date +%s) + idle_timeout))
resumed=0
while true; do
    state=$(node_state)
    [[ $state =~ ^(idle|mix|alloc)$ ]] && break
    # A node left down or drained by an earlier run is put back into service once.
    if [[ $state =~ ^(down|drain|drng)$ ]] && [ "$resumed" -eq 0 ]; then
        scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
        resumed=1
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        tail -n 5 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
        die "node $host is '${state:-?}', not idle, after ${idle_timeout} s"
    fi
    sleep 0.2
done

# Smoke test: one real batch job, with a fake GPU.
smoke=$(mktemp /tmp/start-slurm-smoke.XXXXXX)
if ! timeout 60 sbatch --wait --quiet --job-name=smoke --gres=gpu:1 --output="$smoke" \
    --wrap 'hostname; echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"' >/dev/null; then
    cat "$smoke" >&2 || true
    rm -f "$smoke"
    die "smoke job 'sbatch --wait --wrap hostname' failed"
fi
if ! grep -qx "$host" "$smoke" || ! grep -q '^CUDA_VISIBLE_DEVICES=[0-9]' "$smoke"; then
    cat "$smoke" >&2
    rm -f "$smoke"
    die "smoke job ran but its output is not the expected hostname and CUDA_VISIBLE_DEVICES"
fi
rm -f "$smoke"
summary "started"
