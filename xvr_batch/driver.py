"""The driver of a reconstruction: locks, plan, run the pending units on a backend, finalise.

:func:`run` is what ``xvr-batch reconstruct`` and ``resume`` call, in every process of the run::

    backend.start(device)  ->  driver process?  --no-->  exit with backend.follow()
                                 | yes
                          reconstruct(): lock the work directory and the output, prepare (plan or
                          resume), backend.execute(pending), finalise (stitch, rename)
                                 |
                          backend.finish(code)   the other processes exit with the same status

The unit engine (:mod:`xvr_batch.pipeline`) knows nothing of backends; the backends use the engine; this
module is the only one that uses both.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from xvr_batch.backends.base import Backend, exit_code_for, stop_flag
from xvr_batch.errors import EXIT_STOPPED, UserError
from xvr_batch.pipeline import Options, check_output_target, finalise, pending_units, prepare

__all__ = ["run", "reconstruct"]


def reconstruct(opts: Options, backend: Backend | None = None, command: list[str] | None = None,
                config: dict | None = None, progress: bool = True,
                log: Callable[[str], None] = lambda s: None) -> str | None:
    """Plan (or resume), run the pending units on ``backend``, finalise. Returns the output path, or None
    when the backend stopped early on a signal (the work directory then holds everything done so far).

    Call it in the driver process only; :func:`run` does that for launched backends."""
    from xvr_batch.backends.local import LocalBackend
    from xvr_batch.lock import OutputLock
    from xvr_batch.workdir import WorkDir

    backend = backend or LocalBackend()
    opts = opts.absolute()
    check_output_target(opts)
    wd_path = opts.resolved_workdir()
    created = not wd_path.exists()
    try:
        wd_path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the work directory {wd_path} ({exc.strerror}); "
                        "choose another --workdir") from None
    job = None
    try:
        with OutputLock(opts.output, workdir=str(wd_path)), WorkDir(wd_path).lock():
            WorkDir(wd_path).remove_stale_temps()  # part temporaries of killed runs
            job = prepare(opts, command, config, log=log, locked=True)
            created = False  # the work directory now holds a valid plan
            pending = pending_units(job)
            done = len(job.plan().units) - len(pending)
            if done:
                log(f"{done} units already done; {len(pending)} to go")
            stop_flag.install()
            if not backend.execute(job, pending, progress=progress):
                log(f"stopped on request; {wd_path} holds the finished units; run the same command "
                    f"(or `xvr-batch resume {wd_path}`) to resume")
                return None
            return finalise(job, log=log, progress=progress, overwrite=opts.overwrite, layout=opts.layout)
    finally:
        if job is not None:
            job.close()
        if created:
            shutil.rmtree(wd_path, ignore_errors=True)


def run(opts: Options, backend: Backend, command: list[str] | None = None, config: dict | None = None,
        progress: bool = True, log: Callable[[str], None] = lambda s: None) -> str | None:
    """Run a reconstruction on ``backend`` in this process, whatever its role.

    In the driver it returns what :func:`reconstruct` returns and raises its errors. In the other
    processes of a launched backend it does not return: it exits with the driver's status (0,
    :data:`~xvr_batch.errors.EXIT_STOPPED`, 2 for a user error, 1 otherwise)."""
    try:
        if not backend.start(opts.device):
            raise SystemExit(backend.follow())
        code, message = 1, None
        try:
            out = reconstruct(opts, backend, command=command, config=config, progress=progress, log=log)
            code = 0 if out is not None else EXIT_STOPPED
            return out
        except BaseException as exc:
            code, message = exit_code_for(exc), str(exc)
            raise
        finally:
            try:
                backend.finish(code, message)
            except Exception as exc:  # never hide the real error behind a failed announcement
                log(f"warning: could not tell the other processes to stop: {exc}")
    finally:
        backend.close()
