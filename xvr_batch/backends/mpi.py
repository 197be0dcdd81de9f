"""``mpi`` (mpi4py): rank 0 hands out units from a work queue; the other ranks compute them.

Launch::

    mpiexec -n R xvr-batch reconstruct A.h5 -o O.h5 --backend mpi
    srun --mpi=pmi2 -n R xvr-batch reconstruct A.h5 -o O.h5 --backend mpi      # inside an allocation

How the ranks work together (:class:`MPIBackend`, :func:`xvr_batch.driver.run`):

* Rank 0, the driver, runs :func:`~xvr_batch.driver.reconstruct` (locks, prepare, finalise). Its backend's
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

from xvr_batch.backends.base import Backend, Backoff, cuda_device_for, error_payload, raise_remote_error, stop_flag
from xvr_batch.errors import UserError
from xvr_batch.plan import Unit

__all__ = ["MPIBackend", "worker_device"]

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


def worker_device(job_device: str, node_index: int) -> str:
    """The device a worker rank drives: ``cuda:i`` for the i-th worker on its node, modulo the GPUs."""
    return cuda_device_for(job_device, node_index)


class MPIBackend(Backend):
    """MPI execution: every rank of an mpiexec/srun launch runs the same command. :meth:`start` says
    which rank drives (rank 0); rank 0's :meth:`execute` hands out units, the others work in
    :meth:`follow` and exit with the status rank 0 sends in :meth:`finish`."""

    name = "mpi"

    def __init__(self, device: str | None = None, log: Callable[[str], None] = lambda s: None):
        super().__init__(device, log)
        self.comm = None
        self.job_sent = False
        self.node_index = 0

    def start(self, device: str = "auto") -> bool:  # noqa: ARG002
        MPI = _mpi()
        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        stop_flag.install()
        # node-local index of each worker rank (rank 0 only coordinates), for GPU binding
        workers = comm.Split(MPI.UNDEFINED if rank == 0 else 1, rank)
        if workers != MPI.COMM_NULL:
            local = workers.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
            self.node_index = local.Get_rank()
            local.Free()
            workers.Free()
        self.comm = comm
        if rank == 0:
            vendor, version = MPI.get_vendor()
            self.log(f"mpi: world size {size} ({vendor} {'.'.join(map(str, version))}); "
                     + ("rank 0 runs every unit itself" if size == 1
                        else f"rank 0 hands out units to {size - 1} worker rank(s)"))
        return rank == 0

    def execute(self, job, pending: Sequence[Unit], progress: bool = True) -> bool:
        from xvr_batch.backends.local import run_units_here

        comm = self.comm
        if comm is None:
            MPI = _mpi()
            if MPI.COMM_WORLD.Get_size() > 1:
                raise UserError("--backend mpi: start xvr-batch reconstruct --backend mpi under mpiexec or srun "
                                "(every rank must run the command)")
        if comm is None or comm.Get_size() == 1:
            return run_units_here(self, job, pending, progress)
        return self._coordinate(job, pending, progress)

    def _coordinate(self, job, pending: Sequence[Unit], progress: bool) -> bool:
        MPI = _mpi()
        comm = self.comm
        size = comm.Get_size()
        payload = {"job": job.to_dict()}
        reqs = [comm.isend(payload, dest=r, tag=TAG_JOB) for r in range(1, size)]
        self.job_sent = True
        queue = deque(pending)
        active = size - 1
        stopping = False
        recorded: set[int] = set()
        errors: list[dict] = []
        per_rank: dict[int, int] = {}
        self.open_progress(pending, progress)
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
                    err = msg["error"]
                    errors.append(err)
                    self.record_failure(job, err.get("unit"), f"{err['type']}: {err['message']}")
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
                        self.record(job, rec, rank=src)
                        recorded.add(rec["unit"])
                        per_rank[src] = per_rank.get(src, 0) + 1
                    except BaseException as exc:  # cannot record: stop everyone, then raise it
                        journal_error = journal_error or exc
                        stopping = True
        finally:
            self.close_progress()
            MPI.Request.waitall(reqs)
        if journal_error is not None:
            raise journal_error
        if errors:
            raise_remote_error(errors[0])
        done = ", ".join(f"rank {r}: {n}" for r, n in sorted(per_rank.items()))
        self.log(f"mpi: {len(recorded)} units done ({done or 'none'})")
        return recorded >= {u.id for u in pending}

    def follow(self) -> int:
        """A worker rank: get the Job, ask rank 0 for units until told to stop; return rank 0's exit code."""
        return _work(self.comm, self.comm.Get_rank(), self.node_index, self.device)

    def finish(self, code: int, message: str | None) -> None:
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
    failed_unit = None
    try:
        while True:
            request = {"record": record, "stopping": stop_flag.requested,
                       "error": error_payload(f"rank {rank}", error, failed_unit) if error is not None else None}
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
                error, failed_unit = exc, uid
    finally:
        if runner is not None:
            runner.close()
    _, code = _poll_recv(comm, 0, (TAG_FINAL,))
    return int(code)
