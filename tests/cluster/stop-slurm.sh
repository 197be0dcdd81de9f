#!/usr/bin/env bash
# Stop the single-node Slurm cluster started by tests/cluster/start-slurm.sh.
#
#   bash tests/cluster/stop-slurm.sh            # stop slurmd and slurmctld, leave munged running
#   bash tests/cluster/stop-slurm.sh --munge    # stop munged too
#
# Each daemon is stopped through the pid in its pid file, and only if that pid is a live process of
# the expected program (a stale pid file is removed, never acted on). Nothing is killed by name.
# Jobs still running are left to finish or be cleaned up at the next start.
set -euo pipefail

stop_munge=0
case "${1:-}" in
    "") ;;
    --munge) stop_munge=1 ;;
    *) echo "usage: $0 [--munge]" >&2; exit 2 ;;
esac

log() { echo "stop-slurm: $*" >&2; }

stop_daemon() {  # stop_daemon PIDFILE NAME
    local pidfile=$1 name=$2 pid i
    if [ ! -s "$pidfile" ]; then
        return 0
    fi
    pid=$(cat "$pidfile")
    if ! [[ $pid =~ ^[0-9]+$ ]] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]; then
        log "removing stale $pidfile"
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        [ -d "/proc/$pid" ] || break
        sleep 0.1
    done
    if [ -d "/proc/$pid" ]; then
        log "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$pidfile"
}

stop_daemon /run/slurm/slurmd.pid slurmd
stop_daemon /run/slurm/slurmctld.pid slurmctld
if [ "$stop_munge" -eq 1 ]; then
    stop_daemon /run/munge/munged.pid munged
fi
echo "slurm: stopped$([ "$stop_munge" -eq 1 ] && echo ' (and munged)')"
