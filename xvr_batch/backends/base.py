"""The one small interface every execution backend implements.

A backend gets a planned :class:`~xvr_batch.pipeline.Job` and the units still pending, runs each unit with
:class:`~xvr_batch.pipeline.UnitRunner` (the same code everywhere), and records each completion in the
journal from one process only. It returns True when every pending unit finished, False when it stopped
early on request (preemption or walltime signal); the driver then finalises or exits for a later resume.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Protocol, Sequence

from xvr_batch.plan import Unit

__all__ = ["Backend", "Backoff", "exit_code_for", "reconstruct_and_announce", "StopFlag", "stop_flag", "EXIT_STOPPED"]

# Exit status after a clean stop on SIGUSR2/SIGTERM: 0, so that launchers (torchrun, srun) and the job
# scripts in slurm/ treat it as a clean end and may requeue; the output file is then absent and the
# message on stderr says to run the same command again to resume.
EXIT_STOPPED = 0


class StopFlag:
    """Set by SIGUSR2/SIGTERM: finish (or abandon) the current unit, then stop cleanly."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal: int | None = None

    def install(self, signals: Sequence[int] = (signal.SIGUSR2, signal.SIGTERM)) -> "StopFlag":
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.signal = signum
        self._event.set()

    def set(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:
        return self._event.is_set()


stop_flag = StopFlag()


class Backend(Protocol):
    name: str

    def execute(self, job, pending: Sequence[Unit], progress: bool = True) -> bool:
        """Run ``pending`` units of ``job``; record completions; True if all finished."""
        ...


class Backoff:
    """Sleep a little longer on each idle poll (doubling from ``lo`` to ``hi`` seconds); reset on activity."""

    def __init__(self, lo: float, hi: float):
        self.lo, self.hi, self.cur = lo, hi, lo

    def reset(self) -> None:
        self.cur = self.lo

    def sleep(self) -> None:
        time.sleep(self.cur)
        self.cur = min(self.hi, self.cur * 2)


def exit_code_for(exc: BaseException) -> int:
    """The exit status a launched run reports to every rank when rank 0 ends with ``exc``."""
    from xvr_batch.errors import UserError

    if isinstance(exc, UserError):
        return UserError.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    return 1


def reconstruct_and_announce(backend, opts, **kwargs):
    """Rank 0 of a launched backend: run :func:`~xvr_batch.pipeline.reconstruct` on ``backend``, then tell
    the other ranks how it ended (``backend._announce(code, message)``), whatever happened."""
    import sys

    from xvr_batch.pipeline import reconstruct

    code, message = 1, None
    try:
        out = reconstruct(opts, backend, **kwargs)
        code = 0 if out is not None else EXIT_STOPPED
        return out
    except BaseException as exc:
        code, message = exit_code_for(exc), str(exc)
        raise
    finally:
        try:
            backend._announce(code, message)
        except Exception as exc:  # never hide the real error behind a failed announcement
            print(f"warning: could not tell the other ranks to stop: {exc}", file=sys.stderr)
