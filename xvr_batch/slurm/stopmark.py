"""The "stopped cleanly" marker a job script reads after its step ends.

A run that stops cleanly on request exits with :data:`xvr_batch.errors.EXIT_STOPPED` (75), but the
launchers in between do not pass that status on: torchrun reports any failed worker as 1, and
``srun --kill-on-bad-exit`` reports 143 once it has terminated the other tasks. So the job scripts
(see :mod:`xvr_batch.slurm.shell`) export ``XVR_STOP_MARKER``, a path on the submit directory, and a
process that exits with status 75 first creates that file with :func:`record_stopped`. After the step,
the script treats the run as stopped (and requeues it) if the step exited with 75 or the file exists.
No heavy imports: this runs on the way out of every rank.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Mapping, Optional

__all__ = ["STOP_MARKER_ENV", "record_stopped"]

#: Environment variable that names the marker file (set by the job scripts only).
STOP_MARKER_ENV = "XVR_STOP_MARKER"


def record_stopped(env: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Create the marker named by ``$XVR_STOP_MARKER``, if set; return its path (None if unset).

    Any rank may call it, any number of times. Errors are swallowed (the exit status still says 75
    where the launcher passes it on): a marker that cannot be written must not hide the stop.
    """
    path = (os.environ if env is None else env).get(STOP_MARKER_ENV, "")
    if not path:
        return None
    record = {"status": 75, "pid": os.getpid(), "host": socket.gethostname(),
              "rank": (os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0")}
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError:
        return None
    return path
