"""``mpi`` (mpi4py): rank 0 hands out units from a work queue; the other ranks compute them.

Launch::

    mpiexec -n R xvr-batch reconstruct A.h5 -o O.h5 --backend mpi
    srun --mpi=pmi2 -n R xvr-batch reconstruct A.h5 -o O.h5 --backend mpi      # inside an allocation

How the ranks work together (:func:`run_distributed`):

* Rank 0 runs :func:`~xvr_batch.pipeline.reconstruct` (lock, prepare, finalise). Its backend's
  :meth:`MPIBackend.execute` sends the planned Job to every worker rank, or the error when prepare
  failed (every rank then exits with the same code, and only rank 0 prints the message).
* Work queue: a worker sends a request (carrying the record of the unit it just finished, if any);
  rank 0 appends that record to the journal (the journal has one writer), then replies with the next
  unit id, or with a stop when the queue is empty or a stop was requested. Units are handed out
  dynamically, so uneven unit costs and unit counts balance themselves.
* With ``-n 1`` rank 0 runs every unit itself. With more ranks, rank 0 only coordinates (it polls
  with short sleeps, so it takes next to no CPU) and each other rank drives one GPU when the job
  runs on CUDA: the i-th worker rank on a node takes ``cuda:i`` modulo the visible devices.
* SIGUSR2/SIGTERM on any rank: the workers finish their current unit, rank 0 records it and exits with
  ``EXIT_STOPPED``; the others exit with it. (MPICH's ``mpiexec`` forwards SIGTERM to every rank; it
  does not forward SIGUSR2, which must be sent to the ranks themselves, as ``scancel --signal`` does.)

Waiting is done by polling (``Iprobe`` with sleeps from 0.1 ms to 5 ms), never by a blocking receive:
MPICH spins in blocking calls, which would take a core from the ranks that compute.
"""

from __future__ import annotations

import traceback
from collections import deque
from typing import Any, Callable, Sequence

from xvr_batch.backends.base import Backoff, reconstruct_and_announce, stop_flag
from xvr_batch.errors import UserError
from xvr_batch.plan import Unit

__all__ = ["MPIBackend", "run_distributed"]

TAG_JOB, TAG_REQUEST, TAG_ASSIGN, TAG_FINAL = 11, 12, 13, 14


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise UserError(f"--backend mpi needs mpi4py ({exc}); install it with pip install 'xvr_batch[mpi]'") from None
    return MPI


def _probe(comm, source: int, tag: int, status=None) -> bool:
    """``Iprobe`` twice: MPICH's Iprobe looks at the queue before it makes progress, so a message that
    arrived while we slept is only seen by the second call (one call per wake-up costs a whole sleep)."""
    return bool(comm.Iprobe(source=source, tag=tag, status=status)
                or comm.Iprobe(source=source, tag=tag, status=status))


def _poll_recv(comm, source: int, tags: Sequence[int]) -> tuple[int, Any]:
    """Receive the next message from ``source`` with one of ``tags`` without spinning a core."""
    backoff = Backoff(0.0001, 0.005)
    while True:
        for tag in tags:
            if _probe(comm, source, tag):
                return tag, comm.recv(source=source, tag=tag)
        backoff.sleep()


def _error_payload(rank: int, exc: BaseException) -> dict:
    return {"rank": rank, "user": isinstance(exc, UserError), "message": str(exc) or type(exc).__name__,
            "type": type(exc).__name__}


def worker_device(job_device: str, node_index: int) -> str:
    """The device a worker rank drives: ``cuda:i`` for the i-th worker on its node, modulo the GPUs."""
    if not job_device.startswith("cuda"):
        return job_device
    import torch

    n = torch.cuda.device_count()
    return f"cuda:{node_index % n}" if n else job_device


class MPIBackend:
    """MPI execution. :func:`run_distributed` starts every rank (the CLI does); :meth:`execute` is rank 0's
    side, which :func:`~xvr_batch.pipeline.reconstruct` calls."""

    name = "mpi"

    def __init__(self, device: str | None = None, log: Callable[[str], None] = lambda s: None):
        self.device = device
        self.log = log
        self.comm = None
        self.job_sent = False

    def run_distributed(self, opts, command=None, config=None, progress: bool = True,
                        log: Callable[[str], None] = lambda s: None):
        return run_distributed(opts, command=command, config=config, progress=progress, log=log, backend=self)

    def execute(self, job, pending: Sequence[Unit], progress: bool = True) -> bool:
        from xvr_batch.backends.local import LocalBackend

        comm = self.comm
        if comm is None:
            MPI = _mpi()
            if MPI.COMM_WORLD.Get_size() > 1:
                raise UserError("--backend mpi: start xvr-batch reconstruct --backend mpi under mpiexec or srun "
                                "(every rank must run the command)")
        if comm is None or comm.Get_size() == 1:
            return LocalBackend(self.device).execute(job, pending, progress=progress)
        return self._coordinate(job, pending, progress)

    def _coordinate(self, job, pending: Sequence[Unit], progress: bool) -> bool:
        from tqdm import tqdm

        MPI = _mpi()
        comm = self.comm
        size = comm.Get_size()
        payload = {"job": job.to_dict()}
        reqs = [comm.isend(payload, dest=r, tag=TAG_JOB) for r in range(1, size)]
        self.job_sent = True
        wd = job.workdir_obj()
        queue = deque(pending)
        active = size - 1
        stopping = False
        recorded: set[int] = set()
        errors: list[dict] = []
        per_rank: dict[int, int] = {}
        bar = tqdm(total=sum(u.stop - u.start for u in pending), unit="frame", desc="reconstruct",
                   disable=not progress, dynamic_ncols=True, smoothing=0.1)
        backoff = Backoff(0.0001, 0.005)
        status = MPI.Status()
        journal_error: BaseException | None = None
        try:
            while active:
                if stop_flag.requested:
                    stopping = True
                if not _probe(comm, MPI.ANY_SOURCE, TAG_REQUEST, status):
                    backoff.sleep()
                    continue
                backoff.reset()
                src = status.Get_source()
                msg = comm.recv(source=src, tag=TAG_REQUEST)
                if msg.get("error"):
                    errors.append(msg["error"])
                    stopping = True
                if msg.get("stopping"):
                    stopping = True
                # reply first, so that the worker computes while this rank writes the journal
                if stopping or not queue:
                    comm.send(None, dest=src, tag=TAG_ASSIGN)
                    active -= 1
                else:
                    comm.send(queue.popleft().id, dest=src, tag=TAG_ASSIGN)
                rec = msg.get("record")
                if rec is not None:
                    try:
                        wd.record_done(rec["unit"], rec["part"], rec["sha256"], rec["frames"], extra={"rank": src})
                        recorded.add(rec["unit"])
                        per_rank[src] = per_rank.get(src, 0) + 1
                        bar.update(rec["frames"][1] - rec["frames"][0])
                    except BaseException as exc:  # cannot record: stop everyone, then raise it
                        journal_error = journal_error or exc
                        stopping = True
        finally:
            bar.close()
            MPI.Request.waitall(reqs)
        if journal_error is not None:
            raise journal_error
        if errors:
            err = errors[0]
            if err["user"]:
                raise UserError(f"rank {err['rank']}: {err['message']}")
            raise RuntimeError(f"rank {err['rank']} failed: {err['type']}: {err['message']} (traceback in its log)")
        done = ", ".join(f"rank {r}: {n}" for r, n in sorted(per_rank.items()))
        self.log(f"mpi: {len(recorded)} units done ({done or 'none'})")
        return recorded >= {u.id for u in pending}

    def _announce(self, code: int, message: str | None) -> None:
        comm = self.comm
        if comm is None or comm.Get_size() == 1:
            return
        MPI = _mpi()
        tag = TAG_FINAL if self.job_sent else TAG_JOB
        body: Any = code if self.job_sent else {"error": message or "failed", "code": code}
        reqs = [comm.isend(body, dest=r, tag=tag) for r in range(1, comm.Get_size())]
        MPI.Request.waitall(reqs)


def _work(comm, rank: int, node_index: int, device: str | None) -> int:
    """A worker rank: get the Job, ask rank 0 for units until told to stop; return rank 0's exit code."""
    from xvr_batch.pipeline import Job, UnitRunner

    tag, msg = _poll_recv(comm, 0, (TAG_JOB,))
    if "error" in msg:
        return int(msg["code"])
    job = Job(**msg["job"])
    units = {u.id: u for u in job.plan().units}
    dev = device or worker_device(job.device, node_index)
    runner = None
    record = None
    error = None
    try:
        while True:
            request = {"record": record, "stopping": stop_flag.requested,
                       "error": _error_payload(rank, error) if error is not None else None}
            comm.send(request, dest=0, tag=TAG_REQUEST)
            record = None
            tag, uid = _poll_recv(comm, 0, (TAG_ASSIGN, TAG_FINAL))
            if tag == TAG_FINAL:
                return int(uid)
            if uid is None:
                break
            try:
                if runner is None:
                    runner = UnitRunner(job, dev)
                record = runner.run_unit(units[uid])
            except Exception as exc:
                if not isinstance(exc, UserError):
                    traceback.print_exc()
                error = exc
    finally:
        if runner is not None:
            runner.close()
    _, code = _poll_recv(comm, 0, (TAG_FINAL,))
    return int(code)


def run_distributed(opts, command: list[str] | None = None, config: dict | None = None, progress: bool = True,
                    log: Callable[[str], None] = lambda s: None, backend: MPIBackend | None = None,
                    device: str | None = None):
    """Run a reconstruction on every rank of an mpiexec/srun launch.

    On rank 0 it returns what :func:`~xvr_batch.pipeline.reconstruct` returns (the output path, or None
    when stopped on a signal) and raises its errors. On the other ranks it does not return: it exits with
    rank 0's status (0, ``EXIT_STOPPED``, 2 for a user error, 1 otherwise).
    """

    MPI = _mpi()
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    stop_flag.install()
    # node-local index of each worker rank (rank 0 only coordinates), for GPU binding
    workers = comm.Split(MPI.UNDEFINED if rank == 0 else 1, rank)
    node_index = 0
    if workers != MPI.COMM_NULL:
        local = workers.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        node_index = local.Get_rank()
        local.Free()
        workers.Free()
    backend = backend or MPIBackend(device=device)
    backend.log = log
    if rank != 0:
        raise SystemExit(_work(comm, rank, node_index, backend.device))
    vendor, version = MPI.get_vendor()
    log(f"mpi: world size {size} ({vendor} {'.'.join(map(str, version))}); "
        + ("rank 0 runs every unit itself" if size == 1 else f"rank 0 hands out units to {size - 1} worker rank(s)"))
    backend.comm = comm
    return reconstruct_and_announce(backend, opts, command=command, config=config, progress=progress, log=log)
