"""``local``: every unit in this process, one after the other (the default backend)."""

from __future__ import annotations

from typing import Sequence

from tqdm import tqdm

from xvr_batch.backends.base import stop_flag
from xvr_batch.plan import Unit

__all__ = ["LocalBackend"]


class LocalBackend:
    name = "local"

    def __init__(self, device: str | None = None):
        self.device = device

    def execute(self, job, pending: Sequence[Unit], progress: bool = True) -> bool:
        from xvr_batch.pipeline import UnitRunner

        if not pending:
            return True
        wd = job.workdir_obj()
        runner = UnitRunner(job, self.device)
        total = sum(u.stop - u.start for u in pending)
        bar = tqdm(total=total, unit="frame", desc="reconstruct", disable=not progress, dynamic_ncols=True,
                   smoothing=0.1)
        try:
            for unit in pending:
                if stop_flag.requested:
                    return False
                rec = runner.run_unit(unit, on_frames=bar.update)
                wd.record_done(rec["unit"], rec["part"], rec["sha256"], rec["frames"])
        finally:
            bar.close()
            runner.close()
        return True
