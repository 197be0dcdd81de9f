"""The one rule for ``MASTER_PORT`` under Slurm: a port derived from the job id.

Every job script that starts torch.distributed ranks exports ``MASTER_PORT=$((BASE + SLURM_JOB_ID % SPAN))``
and :mod:`xvr_batch.backends.torchdist` falls back to the same value when it finds ``SLURM_JOB_ID`` but no
``MASTER_PORT``. Two jobs sharing a first node get different ports unless their ids differ by a multiple
of the span. No heavy imports here: this module is read by the rank start-up code.
"""

from __future__ import annotations

__all__ = ["MASTER_PORT_BASE", "MASTER_PORT_SPAN", "master_port", "master_port_shell"]

#: First port of the range MASTER_PORT is taken from.
MASTER_PORT_BASE = 20000
#: Number of ports in the range (the job id modulo this picks one).
MASTER_PORT_SPAN = 20000


def master_port(job_id: int) -> int:
    """The rendezvous port of Slurm job ``job_id``."""
    return MASTER_PORT_BASE + int(job_id) % MASTER_PORT_SPAN


def master_port_shell(job_id_var: str = "SLURM_JOB_ID") -> str:
    """The same rule as a shell arithmetic expression, for job scripts."""
    return f"$(({MASTER_PORT_BASE} + {job_id_var} % {MASTER_PORT_SPAN}))"
