"""``local``: every unit in this process, one after the other (the default backend)."""

from __future__ import annotations

from typing import Sequence

from xvr_batch.backends.base import Backend, stop_flag
from xvr_batch.plan import Unit

__all__ = ["LocalBackend", "run_units_here"]


def run_units_here(backend: Backend, job, pending: Sequence[Unit], progress: bool = True, runner=None) -> bool:
    """Run ``pending`` in this process with ``backend``'s journaling and progress bar (True if all ran).

    The launched backends use it too when they were started with one process only. ``runner`` reuses an
    already built :class:`~xvr_batch.pipeline.UnitRunner` (archive and model open once per process)."""
    from xvr_batch.pipeline import UnitRunner

    if not pending:
        return True
    own = runner is None
    runner = runner or UnitRunner(job, backend.device)
    bar = backend.open_progress(pending, progress)
    try:
        for unit in pending:
            if stop_flag.requested:
                return False
            try:
                rec = runner.run_unit(unit, on_frames=bar.update)
            except Exception as exc:
                backend.record_failure(job, unit.id, exc)
                raise
            backend.record(job, rec, advance=False)
    finally:
        backend.close_progress()
        if own:
            runner.close()
    return True


class LocalBackend(Backend):
    name = "local"

    def execute(self, job, pending: Sequence[Unit], progress: bool = True) -> bool:
        return run_units_here(self, job, pending, progress)
