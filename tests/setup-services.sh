#!/usr/bin/env bash
# Start what the test suite needs on a fresh Debian machine (run as root):
#   - hdf5-tools (h5dump, to check that the output reads with the HDF5 command-line tools);
#   - a single-node Slurm cluster with two fake GPUs (tests/cluster/start-slurm.sh).
# MPI (the pip `mpich` wheel) and everything Python come from `pip install -e '.[test]'`.
# Without root, it only says what it could not start; those tests then skip with a reason.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ "$(id -u)" -ne 0 ]; then
    echo "setup-services: not root; skipping apt packages and Slurm (their tests will skip)" >&2
    exit 0
fi
if ! command -v h5dump >/dev/null 2>&1; then
    { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends hdf5-tools; } \
        >/var/log/xvr-setup-apt.log 2>&1 || { tail -n 20 /var/log/xvr-setup-apt.log >&2; exit 1; }
fi
bash "$here/cluster/start-slurm.sh"
