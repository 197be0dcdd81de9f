"""Thin wrappers around the Slurm client commands: sbatch, squeue, scontrol, scancel.

:func:`submit` writes a job script into a directory and submits it; :func:`job_state` asks for a job's
state; :func:`is_final` is the one classification of Slurm job states into "still going" and "ended",
used by :func:`wait_for_job` and by :func:`follow_job` (``reconstruct --nodes N --wait``);
:func:`cancel` cancels a job or sends it a signal. No shell is involved: every command is an argument
list, and job ids and signal names are checked first.
"""

from __future__ import annotations

import re
import subprocess
import time as _time
from pathlib import Path
from typing import Callable, Optional

from xvr_batch.errors import UserError

__all__ = [
    "ACTIVE_STATES", "FINAL_STATES", "SCRIPT_NAME", "base_state", "cancel", "follow_job", "is_final", "job_state",
    "submit", "wait_for_job",
]

#: File name of the batch script that :func:`submit` writes into the work directory.
SCRIPT_NAME = "job.sbatch"

#: Job states in which a job is still queued, running, on its way out or on its way back into the queue.
ACTIVE_STATES = frozenset({
    "PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
    "RESIZING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "POWER_UP_NODE", "UPDATE_DB",
})

#: Slurm's terminal job states. Any state that is not in :data:`ACTIVE_STATES` counts as final too (so
#: that a state added by a later Slurm never makes a wait hang); this list documents the known ones.
FINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED", "SPECIAL_EXIT", "REVOKED",
})

# How long a requeueable job may stay PREEMPTED before a wait calls it final: Slurm requeues a
# preempted requeueable job (PreemptMode=REQUEUE) moments later, unless the site cancels instead.
PREEMPTED_GRACE_S = 120.0

# Seconds any one Slurm client command may take before we give up on it.
_CLIENT_TIMEOUT = 60
_JOB_ID_RE = re.compile(r"^[0-9]+(?:_[0-9]+)?(?:\.[A-Za-z0-9_]+)?$")
_SIGNAL_RE = re.compile(r"^(?:(?P<where>[RB]{1,2}):)?(?:SIG)?(?P<name>[A-Z][A-Z0-9]*)(?:@(?P<secs>[0-9]+))?$")


def base_state(state: str) -> str:
    """The state word alone: ``"CANCELLED by 0"``, ``"CANCELLED+"`` -> ``"CANCELLED"``."""
    return re.split(r"[^A-Z_]", state.strip().upper(), maxsplit=1)[0]


def is_final(state: Optional[str], requeueable: bool = False) -> bool:
    """True once a job in ``state`` has ended for good; ``None`` (Slurm forgot the job) is final.

    A requeueable job that is ``PREEMPTED`` is not final: Slurm puts it back in the queue
    (:func:`wait_for_job` still gives up after :data:`PREEMPTED_GRACE_S` seconds in that state).
    """
    if state is None:
        return True
    base = base_state(state)
    if base in ACTIVE_STATES or (requeueable and base == "PREEMPTED"):
        return False
    return True




def _run(args: list[str], cwd: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command (no shell); a missing program is a :class:`UserError`."""
    try:
        return subprocess.run(
            args, cwd=cwd, capture_output=True, text=True, check=False, timeout=_CLIENT_TIMEOUT
        )
    except FileNotFoundError:
        raise UserError(f"{args[0]} not found: is Slurm installed here and on PATH?") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{args[0]} did not answer within {_CLIENT_TIMEOUT} s: is slurmctld up?") from None


def _check_job_id(job_id: str) -> str:
    job_id = str(job_id)
    if not _JOB_ID_RE.match(job_id):
        raise UserError(f"{job_id!r} is not a Slurm job id")
    return job_id


def submit(script_text: str, workdir: str, sbatch: str = "sbatch") -> str:
    """Write ``script_text`` to ``workdir/job.sbatch`` and submit it; return the job id.

    sbatch runs in ``workdir``, so relative log paths (the default ``xvr-%j.out``) land there.
    Raises :class:`UserError` with sbatch's message if it refuses the job or is not installed.
    """
    directory = Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / SCRIPT_NAME
    script.write_text(script_text if script_text.endswith("\n") else script_text + "\n")
    result = _run([sbatch, "--parsable", str(script)], cwd=str(directory))
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise UserError(f"sbatch refused {script}: {message}")
    first = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    job_id = first.split(";")[0]  # "--parsable" prints "ID" or "ID;CLUSTER"
    if not _JOB_ID_RE.match(job_id):
        raise UserError(f"sbatch printed {result.stdout.strip()!r}, not a job id")
    return job_id



def job_state(job_id: str) -> Optional[str]:
    """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``...), or None once Slurm forgot it.

    Asks ``squeue`` first and falls back to ``scontrol show job``, which still knows jobs that
    finished less than MinJobAge seconds ago.
    """
    job_id = _check_job_id(job_id)
    result = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if result.returncode == 0 and result.stdout.strip():
        return result.stdout.split()[0]
    result = _run(["scontrol", "show", "job", job_id])
    if result.returncode == 0:
        match = re.search(r"\bJobState=(\S+)", result.stdout)
        if match:
            return match.group(1)
    return None




def wait_for_job(
    job_id: str,
    poll: float = 2.0,
    timeout: Optional[float] = None,
    on_poll: Optional[Callable[[Optional[str]], None]] = None,
    requeueable: bool = False,
) -> str:
    """Wait until the job has ended (:func:`is_final`); return its final state word.

    The final state is the one Slurm reports, without suffixes (``COMPLETED``, ``FAILED``,
    ``CANCELLED``, ``TIMEOUT``, ``PREEMPTED``, ``NODE_FAIL``, ``OUT_OF_MEMORY``...) or ``"UNKNOWN"`` if
    the job has already been purged. A requeued job is followed through its next run. ``on_poll`` is
    called with the state at each poll. Raises :class:`UserError` after ``timeout`` seconds.
    """
    job_id = _check_job_id(job_id)
    deadline = None if timeout is None else _time.monotonic() + timeout
    preempted_since: Optional[float] = None
    while True:
        state = job_state(job_id)
        if on_poll is not None:
            on_poll(state)
        if state is None:
            return "UNKNOWN"
        base = base_state(state)
        now = _time.monotonic()
        preempted_since = (preempted_since or now) if base == "PREEMPTED" else None
        if is_final(state, requeueable) or (preempted_since is not None and now - preempted_since > PREEMPTED_GRACE_S):
            return base
        if deadline is not None and now >= deadline:
            raise UserError(f"Slurm job {job_id} is still {base} after {timeout:g} s")
        _time.sleep(poll)


def cancel(job_id: str, signal: Optional[str] = None, target: str = "batch") -> None:
    """Cancel the job, or only send it ``signal`` (e.g. ``"USR2"``).

    With a signal, ``target`` chooses who gets it: ``"batch"`` (the batch shell, whose trap passes
    it on to the step: the normal way to ask a job to stop early), ``"full"`` (the batch shell and
    every step) or ``"steps"`` (the steps only).
    """
    job_id = _check_job_id(job_id)
    args = ["scancel"]
    if signal is not None:
        match = _SIGNAL_RE.match(signal)
        if match is None or match["where"] or match["secs"]:
            raise UserError(f"signal {signal!r} is not a signal name such as USR2 or TERM")
        args.append(f"--signal={match['name']}")
        flags = {"batch": ["--batch"], "full": ["--full"], "steps": []}
        if target not in flags:
            raise UserError(f"signal target {target!r} must be batch, full or steps")
        args += flags[target]
    args.append(job_id)
    result = _run(args)
    if result.returncode != 0:
        raise UserError(f"scancel {job_id} failed: {' '.join(result.stderr.split()) or result.returncode}")



def follow_job(job_id: str, workdir: Path, output: Path, poll: float = 2.0, progress: bool = True) -> str:
    """Wait for a submitted reconstruct job to end, showing frames done from its work directory's manifest.

    Returns the final state (as :func:`wait_for_job`). The job is requeueable, so a requeue or a
    preemption is followed through to the next run.
    """
    from tqdm import tqdm

    from xvr_batch.workdir import WorkDir

    wd = WorkDir(workdir)
    bar = None

    def show(state: Optional[str]) -> None:
        nonlocal bar
        if not wd.exists():
            return
        try:
            st = wd.status()
        except UserError:
            return
        if bar is None:
            bar = tqdm(total=st["n_frames"], unit="frame", desc=f"job {job_id}", disable=not progress)
        bar.n = st["frames_done"]
        bar.set_postfix_str((state or "unknown").lower())
        bar.refresh()

    try:
        return wait_for_job(job_id, poll=poll, on_poll=show, requeueable=True)
    finally:
        if bar is not None:
            if output.exists():
                bar.n = bar.total
                bar.refresh()
            bar.close()
