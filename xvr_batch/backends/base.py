"""The interface every execution backend implements, and what they all share.

A backend's life in one process (see :func:`xvr_batch.driver.run`)::

    backend.start(device)    -> True in the one process that drives the run (rank 0, the Dask client)
      driver:  prepare -> backend.execute(job, pending) -> finalise
      others:  backend.follow() -> the exit status the driver announced
    backend.finish(code, message)   the driver tells the other processes how the run ended
    backend.close()

:meth:`Backend.execute` gets a planned :class:`~xvr_batch.pipeline.Job` and the units still pending, runs
each with :class:`~xvr_batch.pipeline.UnitRunner` (the same code everywhere) and records each completion
in the journal from the driver only (:meth:`Backend.record`). It returns True when every pending unit
finished and False when it stopped early on request (a preemption or walltime signal); the driver then
finalises, or exits with :data:`~xvr_batch.errors.EXIT_STOPPED` for a later resume.

What every backend needs lives here once: the progress bar, journaling of completions and failures,
turning a remote rank's error into the local exception, and the device a worker drives.
"""

from __future__ import annotations

import signal
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

from xvr_batch.errors import EXIT_STOPPED, UserError
from xvr_batch.plan import Unit

__all__ = ["Backend", "Backoff", "exit_code_for", "StopFlag", "stop_flag", "EXIT_STOPPED", "cuda_device_for",
           "error_payload", "raise_remote_error"]


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

    def clear(self) -> None:
        self.signal = None
        self._event.clear()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:
        return self._event.is_set()


stop_flag = StopFlag()


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
    """The exit status a launched run reports to every rank when the driver ends with ``exc``."""
    if isinstance(exc, UserError):
        return UserError.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    return 1


def error_payload(where: str, exc: BaseException, unit: int | None = None) -> dict:
    """A picklable, JSON-able description of ``exc`` raised by ``where`` (e.g. "rank 3") on ``unit``."""
    return {"where": where, "unit": unit, "user": isinstance(exc, UserError),
            "message": str(exc) or type(exc).__name__, "type": type(exc).__name__}


def raise_remote_error(err: dict) -> None:
    """Raise, in the driver, the error another process described with :func:`error_payload`."""
    if err.get("user"):
        raise UserError(f"{err['where']}: {err['message']}")
    raise RuntimeError(f"{err['where']} failed: {err['type']}: {err['message']} (traceback in its log)")


def cuda_device_for(job_device: str, index: int) -> str:
    """The device the ``index``-th worker on a node drives: ``cuda:index`` modulo the visible GPUs.

    Jobs planned for the CPU stay on the CPU; an explicit ``cuda:N`` is only remapped when the index says so."""
    if not job_device.startswith("cuda"):
        return job_device
    import torch

    n = torch.cuda.device_count()
    return f"cuda:{index % n}" if n else job_device


class Backend(ABC):
    """One way of running the pending units of a job. Subclasses implement :meth:`execute`; the launched
    backends (one process per rank) also override :meth:`start`, :meth:`follow` and :meth:`finish`."""

    name: str = "?"

    def __init__(self, device: str | None = None, log: Callable[[str], None] = lambda s: None):
        self.device = device
        self.log = log
        self._bar: Any = None

    # ------------------------------------------------------------------ lifecycle
    def start(self, device: str = "auto") -> bool:  # noqa: ARG002
        """Join the other processes of the run (if any), for a run on ``device`` (the ``--device`` given).
        True in the driver process, False elsewhere."""
        return True

    def follow(self) -> int:
        """In a process that is not the driver: work until the driver ends the run; return its exit status."""
        raise RuntimeError(f"backend {self.name} has no processes besides the driver")

    @abstractmethod
    def execute(self, job, pending: Sequence[Unit], progress: bool = True) -> bool:
        """Run ``pending`` units of ``job``, record completions; True if all finished, False if stopped."""

    def finish(self, code: int, message: str | None) -> None:  # noqa: ARG002
        """In the driver, after the run: tell the other processes to exit with ``code``."""

    def close(self) -> None:
        """Leave the run (process groups, connections). Idempotent."""

    # ------------------------------------------------------------------ shared by every backend
    def open_progress(self, pending: Sequence[Unit], progress: bool):
        from tqdm import tqdm

        self._bar = tqdm(total=sum(u.stop - u.start for u in pending), unit="frame", desc="reconstruct",
                         disable=not progress, dynamic_ncols=True, smoothing=0.1)
        return self._bar

    def close_progress(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def record(self, job, rec: dict, advance: bool = True, **extra: Any) -> None:
        """Journal one finished unit (driver only) and, unless its frames were counted as they were written
        (``advance=False``), advance the progress bar by them."""
        extra = {k: v for k, v in {"consistency": rec.get("consistency"), **extra}.items() if v is not None}
        job.workdir_obj().record_done(rec["unit"], rec["part"], rec["sha256"], rec["frames"], extra=extra or None)
        if advance and self._bar is not None:
            self._bar.update(rec["frames"][1] - rec["frames"][0])

    def record_failure(self, job, unit: int | None, exc_or_message: BaseException | str) -> None:
        """Journal that ``unit`` failed, so that ``status`` shows it; never hides the original error."""
        if unit is None:
            return
        text = exc_or_message if isinstance(exc_or_message, str) else (
            f"{type(exc_or_message).__name__}: {exc_or_message}")
        try:
            job.workdir_obj().record_failed(int(unit), text)
        except Exception as exc:  # noqa: BLE001  (the journal may be what failed)
            self.log(f"warning: could not record the failure of unit {unit} in the journal: {exc}")
