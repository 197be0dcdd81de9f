"""``torch``: one process per GPU (or per CPU slot), launched by ``torchrun`` or ``srun``.

Launch::

    torchrun --standalone --nproc-per-node G -m xvr_batch reconstruct A.h5 -o O.h5 --backend torch
    srun -n G xvr-batch reconstruct A.h5 -o O.h5 --backend torch     # inside an allocation

How the ranks work together (:meth:`TorchBackend.start`, :func:`xvr_batch.driver.run`):

* Every rank joins the default process group (NCCL on GPUs, gloo on the CPU). The rank, world size and
  local rank come from torchrun (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``) or from srun
  (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``). ``MASTER_ADDR`` defaults to the first node of
  the Slurm job or 127.0.0.1, ``MASTER_PORT`` to ``20000 + SLURM_JOB_ID % 20000`` (as the Slurm
  templates export it) or 29500.
* Only rank 0, the driver, runs :func:`~xvr_batch.driver.reconstruct` (locks, prepare, finalise).
  Its backend's :meth:`TorchBackend.execute` broadcasts the planned Job (``broadcast_object_list``);
  if prepare fails, the error is broadcast instead and every rank exits with the same code.
* Units are shared dynamically through an atomic counter in the rendezvous TCPStore: each rank takes
  the next pending unit when it is free, so none is lost or done twice, whatever the unit count.
* A rank posts each finished unit's record to the store; a recorder thread on rank 0 appends them to
  the journal as they arrive (the journal has one writer).
* A stop request (SIGUSR2/SIGTERM on any rank) is shared through the store: every rank finishes its
  current unit and stops; rank 0 exits with ``EXIT_STOPPED`` and the other ranks with it.
* All ranks meet at a barrier; rank 0 finalises and posts the exit status, which every rank exits with.

Each rank binds ``cuda:LOCAL_RANK`` (modulo the visible devices) when the job runs on CUDA.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

from xvr_batch.backends.base import Backend, Backoff, cuda_device_for, error_payload, raise_remote_error, stop_flag
from xvr_batch.errors import UserError
from xvr_batch.plan import Unit
from xvr_batch.slurm.ports import master_port

__all__ = ["TorchBackend", "LaunchContext", "launch_context", "rank_device"]

DEFAULT_MASTER_PORT = 29500
#: Seconds a collective may wait (rank 0 may spend long in prepare or finalise); XVR_DIST_TIMEOUT overrides.
DEFAULT_TIMEOUT_S = 6 * 3600


@dataclass
class LaunchContext:
    """Where this process sits in the run: rank, world size, node-local rank and the rendezvous."""

    rank: int
    world: int
    local_rank: int
    source: str  # "torchrun", "srun" or "single"
    addr: str
    port: int


def _int_env(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_first_host() -> str | None:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return None
    if "[" not in nodelist and "," not in nodelist:
        return nodelist
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def launch_context() -> LaunchContext:
    """Rank, world size and rendezvous from torchrun's or srun's environment (one process otherwise)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int_env("RANK"), _int_env("WORLD_SIZE")
        local = _int_env("LOCAL_RANK", 0)
        source = "torchrun"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and (
            "SLURM_STEP_ID" in env or "SLURM_STEPID" in env or "MASTER_PORT" in env):
        # an srun step (a batch script's own shell also has SLURM_PROCID=0 and SLURM_NTASKS, but no
        # step id: there, unless MASTER_PORT says otherwise, this process is the only rank)
        rank, world = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS")
        local = _int_env("SLURM_LOCALID", 0)
        source = "srun"
    else:
        rank, world, local, source = 0, 1, 0, "single"
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"bad launch environment: rank {rank} of world size {world}")
    addr = env.get("MASTER_ADDR") or (_slurm_first_host() if source == "srun" else None) or "127.0.0.1"
    port = _int_env("MASTER_PORT")
    if port is None:
        job_id = _int_env("SLURM_JOB_ID")
        if job_id is not None and source == "srun":
            port = master_port(job_id)
        elif world == 1:
            port = _free_port()
        else:
            port = DEFAULT_MASTER_PORT
    return LaunchContext(rank=rank, world=world, local_rank=local, source=source, addr=addr, port=port)


def rank_device(job_device: str, local_rank: int, world: int) -> str:
    """The device one rank drives: ``cuda:LOCAL_RANK`` modulo the visible GPUs when on CUDA."""
    if world == 1 and job_device.startswith("cuda:"):
        return job_device  # an explicit --device cuda:N with one process is respected
    return cuda_device_for(job_device, local_rank)


def _timeout() -> timedelta:
    try:
        return timedelta(seconds=float(os.environ.get("XVR_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
    except ValueError:
        raise UserError(f"XVR_DIST_TIMEOUT={os.environ['XVR_DIST_TIMEOUT']!r} is not a number of seconds") from None


class _Keys:
    def __init__(self, token: str):
        p = f"xvr/{token}/"
        self.next, self.stop, self.nrec, self.finished = p + "next", p + "stop", p + "nrec", p + "finished"
        self.final, self.ack = p + "final", p + "ack"
        self.rec = lambda n: f"{p}rec/{n}"
        self.error = lambda r: f"{p}error/{r}"


def _store_client(ctx: LaunchContext):
    """A new client connection to the rendezvous TCPStore (torchrun's agent store or rank 0's)."""
    from torch.distributed import TCPStore

    addr = os.environ.get("MASTER_ADDR", ctx.addr)
    port = int(os.environ.get("MASTER_PORT", ctx.port))
    return TCPStore(addr, port, is_master=False, wait_for_workers=False, timeout=timedelta(seconds=300))


def _barrier() -> None:
    """A barrier on the default group (on NCCL, on this rank's own GPU)."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


class _UnitLoop:
    """What every rank does: take the next pending unit from the shared counter, run it, post its record."""

    def __init__(self, job, pending_ids: Sequence[int], store, keys: _Keys, ctx: LaunchContext, device: str | None):
        self.job, self.pending_ids, self.store, self.keys, self.ctx = job, list(pending_ids), store, keys, ctx
        self.device = device
        self.error: BaseException | None = None
        self.count = 0

    def run(self) -> None:
        from xvr_batch.pipeline import UnitRunner

        units = {u.id: u for u in self.job.plan().units}
        runner = None
        uid = None
        k, store = self.keys, self.store
        try:
            while True:
                if stop_flag.requested:
                    store.set(k.stop, str(self.ctx.rank))
                if store.check([k.stop]):
                    break
                i = store.add(k.next, 1) - 1
                if i >= len(self.pending_ids):
                    break
                uid = self.pending_ids[i]
                if runner is None:
                    runner = UnitRunner(self.job, self.device)
                rec = dict(runner.run_unit(units[uid]), rank=self.ctx.rank)
                uid = None
                n = store.add(k.nrec, 1)
                store.set(k.rec(n), json.dumps(rec))
                self.count += 1
        except BaseException as exc:  # shared with rank 0, which raises it after everyone has stopped
            self.error = exc
            if self.ctx.rank != 0 and not isinstance(exc, UserError):
                traceback.print_exc()
            try:
                store.set(k.error(self.ctx.rank), json.dumps(error_payload(f"rank {self.ctx.rank}", exc, uid)))
                store.set(k.stop, str(self.ctx.rank))
            except Exception:  # the store is gone: nothing more to tell
                pass
        finally:
            if runner is not None:
                runner.close()
            try:
                store.add(k.finished, 1)
            except Exception:
                pass


class _Recorder(threading.Thread):
    """Rank 0's single journal writer: appends the records every rank posts, as they arrive."""

    def __init__(self, backend: "TorchBackend", job, store, keys: _Keys, world: int):
        super().__init__(name="xvr-recorder", daemon=True)
        self.backend, self.job, self.store, self.keys, self.world = backend, job, store, keys, world
        self.recorded: set[int] = set()
        self.error: BaseException | None = None
        self.remote_errors: list[dict] = []

    def run(self) -> None:
        k, store = self.keys, self.store
        backoff = Backoff(0.001, 0.05)
        n = 1
        try:
            while True:
                if store.check([k.rec(n)]):
                    rec = json.loads(store.get(k.rec(n)))
                    self.backend.record(self.job, rec, rank=rec["rank"])
                    store.delete_key(k.rec(n))
                    self.recorded.add(rec["unit"])
                    n += 1
                    backoff.reset()
                    continue
                if store.add(k.finished, 0) >= self.world and n > store.add(k.nrec, 0):
                    break
                backoff.sleep()
            for r in range(self.world):
                if store.check([k.error(r)]):
                    err = json.loads(store.get(k.error(r)))
                    self.remote_errors.append(err)
                    self.backend.record_failure(self.job, err.get("unit"), f"{err['type']}: {err['message']}")
        except BaseException as exc:
            self.error = exc
            try:
                store.set(k.stop, "0")
            except Exception:
                pass


class TorchBackend(Backend):
    """torch.distributed execution: every rank of a torchrun/srun launch runs the same command.

    :meth:`start` joins the process group (True on rank 0, the driver); rank 0's :meth:`execute`
    broadcasts the planned Job and takes part in the work; the other ranks work in :meth:`follow` and
    exit with the status rank 0 announces in :meth:`finish`. On one process it runs like ``local``.
    """

    name = "torch"

    def __init__(self, device: str | None = None, log: Callable[[str], None] = lambda s: None):
        super().__init__(device, log)
        self.ctx: LaunchContext | None = None
        self.token: str | None = None  # set once the Job has been broadcast
        self.store = None
        self._joined = False

    def start(self, device: str = "auto") -> bool:
        import torch
        import torch.distributed as dist

        ctx = launch_context()
        stop_flag.install()
        guess = self.device or device
        try:
            from xvr_batch.pipeline import resolve_device
            guess = resolve_device(guess)
        except UserError:
            guess = "cpu"  # rank 0's prepare reports it, once
        pg = "nccl" if guess.startswith("cuda") else "gloo"
        if pg == "nccl":
            torch.cuda.set_device(ctx.local_rank % max(1, torch.cuda.device_count()))
        os.environ.setdefault("MASTER_ADDR", ctx.addr)
        os.environ.setdefault("MASTER_PORT", str(ctx.port))
        if ctx.rank == 0:
            self.log(f"torch.distributed: world size {ctx.world} ({pg}, launched by {ctx.source}, "
                     f"rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']})")
            ntasks = os.environ.get("SLURM_NTASKS", "1")
            if ctx.source == "single" and ntasks.isdigit() and int(ntasks) > 1:
                self.log(f"note: SLURM_NTASKS={ntasks} but this is not an srun step: running as one rank "
                         f"(start the command with srun for {ntasks} ranks)")
        try:
            dist.init_process_group(pg, rank=ctx.rank, world_size=ctx.world, timeout=_timeout())
        except RuntimeError as exc:  # DistNetworkError, DistStoreError: the rendezvous failed
            raise UserError(f"torch.distributed: rank {ctx.rank} of {ctx.world} cannot join the rendezvous at "
                            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
                            f"({str(exc).splitlines()[0]}); check MASTER_ADDR/MASTER_PORT and that every rank "
                            "was started") from None
        self._joined = True
        self.ctx = ctx
        return ctx.rank == 0

    def execute(self, job, pending: Sequence[Unit], progress: bool = True) -> bool:
        from xvr_batch.backends.local import run_units_here

        if self.ctx is None:  # not started: fine for one process only
            ctx = launch_context()
            if ctx.world > 1:
                raise UserError(f"--backend torch: {ctx.world} ranks were launched but this code path runs one; "
                                "start xvr-batch reconstruct --backend torch under torchrun or srun")
            return run_units_here(self, job, pending, progress)
        import torch.distributed as dist

        ctx = self.ctx
        token = uuid.uuid4().hex
        payload = [{"job": job.to_dict(), "pending": [u.id for u in pending], "token": token}]
        dist.broadcast_object_list(payload, src=0)
        self.token = token
        keys = _Keys(token)
        self.store = _store_client(ctx)
        self.open_progress(pending, progress)
        try:
            recorder = _Recorder(self, job, _store_client(ctx), keys, ctx.world)
            recorder.start()
            loop = _UnitLoop(job, [u.id for u in pending], self.store, keys, ctx,
                             self.device or rank_device(job.device, ctx.local_rank, ctx.world))
            loop.run()
            recorder.join()
        finally:
            self.close_progress()
        _barrier()
        if loop.error is not None:
            raise loop.error
        if recorder.error is not None:
            raise recorder.error
        if recorder.remote_errors:
            raise_remote_error(recorder.remote_errors[0])
        self.log(f"torch: {len(recorder.recorded)} units done by {ctx.world} rank(s)")
        return recorder.recorded >= {u.id for u in pending}

    def follow(self) -> int:
        """Ranks other than 0: get the Job, run units, wait for rank 0's verdict; return the exit code."""
        import torch.distributed as dist

        from xvr_batch.pipeline import Job

        ctx = self.ctx
        payload: list[Any] = [None]
        dist.broadcast_object_list(payload, src=0)
        msg = payload[0]
        if "error" in msg:
            _barrier()
            return int(msg["code"])
        job = Job(**msg["job"])
        keys = _Keys(msg["token"])
        store = _store_client(ctx)
        dev = self.device or rank_device(job.device, ctx.local_rank, ctx.world)
        loop = _UnitLoop(job, msg["pending"], store, keys, ctx, dev)
        loop.run()
        _barrier()
        backoff = Backoff(0.001, 0.05)
        while not store.check([keys.final]):
            backoff.sleep()
        code = int(store.get(keys.final))
        store.add(keys.ack, 1)
        return code

    def finish(self, code: int, message: str | None) -> None:
        """Rank 0, after the run: tell the other ranks how to exit."""
        import torch.distributed as dist

        if self.ctx is None or self.ctx.world == 1:
            return
        if self.token is None:  # prepare failed: the others still wait for the Job
            dist.broadcast_object_list([{"error": message or "failed", "code": code}], src=0)
            _barrier()
            return
        keys = _Keys(self.token)
        self.store.set(keys.final, str(code))
        deadline = time.monotonic() + 60
        backoff = Backoff(0.001, 0.05)
        while self.store.add(keys.ack, 0) < self.ctx.world - 1 and time.monotonic() < deadline:
            backoff.sleep()

    def close(self) -> None:
        if not self._joined:
            return
        self._joined = False
        import torch.distributed as dist

        try:
            dist.destroy_process_group()
        except Exception:
            pass
