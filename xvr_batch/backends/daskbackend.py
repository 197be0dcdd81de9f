"""``dask`` and ``dask-slurm``: units are Dask tasks on a LocalCluster, an existing scheduler or a
dask-jobqueue SLURMCluster.

::

    xvr-batch reconstruct A.h5 -o O.h5 --backend dask --workers 4            # LocalCluster on this machine
    xvr-batch reconstruct A.h5 -o O.h5 --backend dask --scheduler tcp://host:8786
    xvr-batch reconstruct A.h5 -o O.h5 --backend dask-slurm --nodes 8 --gpus-per-node 4

The process that runs the command is the Dask client and the driver: it takes the work-directory lock,
prepares, records every completion in the journal as it arrives (one writer) and finalises.

* Each unit is one task, :func:`run_unit_task` ``(job_dict, unit_id)``: it rebuilds the Job, runs the
  same :class:`~xvr_batch.pipeline.UnitRunner` code as every backend and returns the journal record.
  One runner (archive handle, model, key-frame cache) is cached per worker process and job.
* The client keeps as many tasks in flight as the cluster has worker threads (it grows as Slurm starts
  workers) and submits the next unit as each one completes.
* A task that raises is retried (``retries``); a task lost with its worker (killed, node lost) is
  rescheduled by the scheduler on another worker. Either way it costs only that unit, and the bytes are
  the same because a unit's output does not depend on where it runs.
* SIGUSR2/SIGTERM to the client: no new units are submitted, the running ones finish and are recorded,
  and the command exits with ``EXIT_STOPPED``; the same command resumes.
* GPUs: each worker owns one GPU and advertises the resource ``GPU`` (``--gpus-per-worker``, default 1
  on CUDA); each task reserves it, so one unit runs per GPU. A worker takes ``cuda:i`` where ``i`` is the
  number at the end of its name (LocalCluster workers are named 0..N-1, dask-jobqueue names the
  processes of one job ``NAME-0``..``NAME-{G-1}``), modulo the visible devices; ``XVR_CUDA_DEVICE``
  set in a worker's environment overrides that.
"""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Sequence

from xvr_batch.backends.base import Backend, cuda_device_for, stop_flag
from xvr_batch.durable import canonical_hash
from xvr_batch.errors import UserError
from xvr_batch.plan import Unit

__all__ = ["DaskBackend", "run_unit_task", "release_runners"]

# ------------------------------------------------------------------------------------------ worker side

_RUNNERS: dict[str, tuple[Any, threading.Lock]] = {}
_RUNNERS_LOCK = threading.Lock()


def _job_key(job_dict: dict) -> str:
    return canonical_hash(job_dict)


def _worker_index() -> int:
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return 0
    if isinstance(name, int):
        return name
    m = re.search(r"(\d+)$", str(name))
    return int(m.group(1)) if m else 0


def worker_device(job_device: str) -> str:
    """The device this worker drives (see the module docstring)."""
    if not job_device.startswith("cuda"):
        return job_device
    forced = os.environ.get("XVR_CUDA_DEVICE")
    if forced:
        return forced if forced.startswith("cuda") else f"cuda:{int(forced)}"
    return cuda_device_for(job_device, _worker_index())


def run_unit_task(job_dict: dict, unit_id: int, threads: int | None = None) -> dict:
    """One Dask task: compute unit ``unit_id`` of the job and return its journal record."""
    from xvr_batch.pipeline import Job, UnitRunner

    key = _job_key(job_dict)
    with _RUNNERS_LOCK:
        entry = _RUNNERS.get(key)
        if entry is None:
            _release_all()
            job = Job(**job_dict)
            if threads and not job.threads:
                import torch

                torch.set_num_threads(threads)  # Dask's nannies set OMP_NUM_THREADS=1
            entry = (UnitRunner(job, worker_device(job.device)), threading.Lock())
            _RUNNERS[key] = entry
    runner, lock = entry
    with lock:  # a runner is not thread-safe; several threads in one worker take turns
        unit = next(u for u in runner.plan.units if u.id == unit_id)
        rec = runner.run_unit(unit)
    try:
        from distributed import get_worker

        rec["worker"] = str(get_worker().name)
    except (ImportError, ValueError):
        pass
    return rec


def _release_all() -> None:
    for key, (runner, lock) in list(_RUNNERS.items()):
        with lock:
            runner.close()
        del _RUNNERS[key]


def release_runners(job_key: str | None = None) -> int:
    """Close cached runners (all, or the one of ``job_key``) in this worker; returns how many."""
    with _RUNNERS_LOCK:
        keys = [k for k in _RUNNERS if job_key is None or k == job_key]
        for k in keys:
            runner, lock = _RUNNERS.pop(k)
            with lock:
                runner.close()
    return len(keys)


# ------------------------------------------------------------------------------------------ client side

def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class DaskBackend(Backend):
    """Run units as Dask tasks. Exactly one of ``scheduler`` (an address), ``slurm=True`` (a
    dask-jobqueue SLURMCluster of ``nodes`` jobs) or neither (a LocalCluster of ``workers`` processes).

    ``on_record(record, client)`` is called after each completion is journaled (tests use it to kill
    a worker at a known moment). ``worker_timeout`` (seconds) gives up when no worker has joined by
    then (a Slurm queue that never starts the worker jobs); by default the client waits.
    ``cluster_kwargs`` go to LocalCluster or SLURMCluster and win over the defaults here and over the
    ``jobqueue.slurm`` Dask configuration.
    """

    def __init__(self, workers: int | None = None, scheduler: str | None = None, slurm: bool = False,
                 nodes: int | None = None, gpus_per_node: int | None = None, gpus_per_worker: int | None = None,
                 device: str | None = None, retries: int = 2, cluster_kwargs: dict | None = None,
                 on_record: Callable[[dict, Any], None] | None = None, worker_timeout: float | None = None,
                 log: Callable[[str], None] = lambda s: None):
        if scheduler and slurm:
            raise UserError("--scheduler and --backend dask-slurm exclude each other: choose one")
        if workers is not None and workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        if nodes is not None and nodes < 1:
            raise UserError(f"--nodes must be at least 1, got {nodes}")
        for name, value in (("--gpus-per-node", gpus_per_node), ("--gpus-per-worker", gpus_per_worker)):
            if value is not None and value < 0:
                raise UserError(f"{name} must be 0 or more, got {value}")
        super().__init__(device, log)
        self.name = "dask-slurm" if slurm else "dask"
        self.workers, self.scheduler, self.slurm = workers, scheduler, slurm
        self.nodes, self.gpus_per_node, self.gpus_per_worker = nodes or 1, gpus_per_node or 0, gpus_per_worker
        self.retries = retries
        self.cluster_kwargs = dict(cluster_kwargs or {})
        self.on_record = on_record
        self.worker_timeout = worker_timeout  # seconds to wait for a first worker (None: for ever)

    # ---------------------------------------------------------------- clusters
    def _gpu_resource(self, job_device: str) -> int:
        if self.gpus_per_worker is not None:
            return self.gpus_per_worker
        if self.slurm:
            return 1 if self.gpus_per_node else 0
        return 1 if job_device.startswith("cuda") else 0

    def slurm_cluster_kwargs(self, workdir: str | None = None) -> dict:
        """SLURMCluster arguments: one job per node, one worker process per GPU (one per node on CPUs).

        ``cores``, ``memory``, ``walltime``, ``queue``, ``account``, ``job_extra_directives`` ... come
        from the ``jobqueue.slurm`` Dask configuration when set there; these defaults fill the gaps."""
        import dask

        cfg = dask.config.get("jobqueue.slurm", default={}) or {}
        g = self.gpus_per_node
        processes = max(1, g)
        kw: dict[str, Any] = {"processes": processes, "job_name": "xvr-dask"}
        if cfg.get("cores") is None:
            kw["cores"] = processes  # one thread per worker: one unit at a time per GPU
        if cfg.get("memory") is None:
            kw["memory"] = f"{16 * processes}GB"
        if cfg.get("job-cpu") is None:
            kw["job_cpu"] = 4 * processes  # CPUs for reading, torch threads and writing
        directives = list(cfg.get("job-extra-directives") or [])
        extra_args = list(cfg.get("worker-extra-args") or [])
        res = self._gpu_resource("cuda" if g else "cpu")
        if g:
            directives.append(f"--gres=gpu:{g}")
        if res:
            extra_args += ["--resources", f"GPU={res}"]
        kw["job_extra_directives"] = directives
        kw["worker_extra_args"] = extra_args
        if cfg.get("log-directory") is None and workdir:
            kw["log_directory"] = os.path.join(workdir, "dask-logs")
        kw.update(self.cluster_kwargs)
        return kw

    def make_slurm_cluster(self, workdir: str | None = None):
        try:
            from dask_jobqueue import SLURMCluster
        except ImportError as exc:
            raise UserError(f"--backend dask-slurm needs dask-jobqueue ({exc}); "
                            "install it with pip install 'xvr_batch[dask]'") from None
        try:
            return SLURMCluster(**self.slurm_cluster_kwargs(workdir))
        except (ValueError, TypeError) as exc:
            raise UserError(f"--backend dask-slurm: {exc}") from None

    def job_script(self, workdir: str | None = None) -> str:
        """The batch script each SLURMCluster worker job runs (nothing is submitted)."""
        cluster = self.make_slurm_cluster(workdir)
        try:
            return cluster.job_script()
        finally:
            cluster.close()

    def _connect(self, job):
        """(client, cluster we own or None, torch threads per worker or None)."""
        try:
            from distributed import Client, LocalCluster
        except ImportError as exc:
            raise UserError(f"--backend dask needs dask.distributed ({exc}); "
                            "install it with pip install 'xvr_batch[dask]'") from None
        if self.scheduler:
            try:
                client = Client(self.scheduler, timeout="60s")
            except OSError as exc:
                raise UserError(f"--scheduler {self.scheduler}: cannot reach the Dask scheduler ({exc})") from None
            return client, None, None
        if self.slurm:
            cluster = self.make_slurm_cluster(job.workdir)
            # keep `nodes` worker jobs alive: a job that ends (walltime, node failure) is replaced
            cluster.adapt(minimum_jobs=self.nodes, maximum_jobs=self.nodes)
            kw = self.slurm_cluster_kwargs(job.workdir)
            procs = int(kw.get("processes") or 1)
            threads = max(1, int(kw.get("job_cpu") or procs) // procs)
            self.log(f"dask-slurm: submitted {self.nodes} worker job(s) of {procs} worker(s) each; "
                     f"scheduler {cluster.scheduler_address}")
            return Client(cluster), cluster, threads
        n = self.workers
        if n is None:
            import torch

            n = torch.cuda.device_count() if job.device.startswith("cuda") else 1
            n = max(1, n)
        res = self._gpu_resource(job.device)
        kw: dict[str, Any] = {"n_workers": n, "processes": True, "threads_per_worker": 1,
                              "dashboard_address": None}
        if res:
            kw["resources"] = {"GPU": res}
        kw.update(self.cluster_kwargs)
        cluster = LocalCluster(**kw)
        self.log(f"dask: LocalCluster with {n} worker process(es) at {cluster.scheduler_address}")
        return Client(cluster), cluster, max(1, _cpus() // n)

    def _task_resources(self, client, job) -> dict | None:
        res = self._gpu_resource(job.device)
        if not res:
            return None
        if self.scheduler and self.gpus_per_worker is None:
            # an existing cluster: reserve GPUs only if its workers advertise them
            workers = client.scheduler_info().get("workers", {}).values()
            if not any("GPU" in (w.get("resources") or {}) for w in workers):
                self.log("dask: the scheduler's workers advertise no GPU resource; units are not pinned")
                return None
        return {"GPU": res}

    # ---------------------------------------------------------------- execution
    def execute(self, job, pending: Sequence[Unit], progress: bool = True) -> bool:
        if not pending:
            return True
        client, cluster, threads = self._connect(job)
        try:
            return self._run(client, job, pending, progress, threads)
        finally:
            try:
                if cluster is None:
                    client.run(release_runners, _job_key(job.to_dict()))
            except Exception:
                pass
            client.close()
            if cluster is not None:
                cluster.close()

    def _run(self, client, job, pending: Sequence[Unit], progress: bool, threads: int | None) -> bool:
        from distributed import TimeoutError as DaskTimeout
        from distributed import wait

        job_dict = job.to_dict()
        token = uuid.uuid4().hex[:8]
        resources = self._task_resources(client, job)
        todo = deque(pending)
        inflight: dict[Any, Unit] = {}
        recorded: set[int] = set()
        errors: list[tuple[Unit, BaseException]] = []
        stopping = False
        window, window_at = 1, float("-inf")
        started, seen_worker = time.monotonic(), False
        self.open_progress(pending, progress)
        try:
            while todo or inflight:
                if stop_flag.requested and not stopping:
                    stopping = True
                    self.log(f"dask: stop requested; waiting for the {len(inflight)} running unit(s)")
                if not stopping and not errors:
                    if time.monotonic() - window_at > 0.5:  # worker threads, as workers come and go
                        threads_now = sum(client.nthreads().values())
                        seen_worker = seen_worker or threads_now > 0
                        window, window_at = max(1, threads_now), time.monotonic()
                    if (not seen_worker and self.worker_timeout is not None
                            and time.monotonic() - started > self.worker_timeout):
                        raise UserError(f"dask: no worker joined the scheduler within {self.worker_timeout:g} s; "
                                        "check the cluster (for dask-slurm: squeue, the worker logs)")
                    while todo and len(inflight) < window:
                        u = todo.popleft()
                        fut = client.submit(run_unit_task, job_dict, u.id, threads, key=f"xvr-unit-{u.id:06d}-{token}",
                                            pure=False, retries=self.retries, resources=resources)
                        inflight[fut] = u
                if not inflight:
                    break
                try:
                    done, _ = wait(list(inflight), timeout=1.0, return_when="FIRST_COMPLETED")
                except (DaskTimeout, TimeoutError):
                    continue
                for fut in done:
                    u = inflight.pop(fut)
                    try:
                        rec = fut.result()  # raises the task's error (after its retries), KilledWorker, ...
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException as exc:  # noqa: BLE001  (CancelledError is a BaseException)
                        if not errors:
                            self.log(f"dask: unit {u.id} failed ({type(exc).__name__}: {exc}); "
                                     f"waiting for the {len(inflight)} running unit(s)")
                        errors.append((u, exc))
                        self.record_failure(job, u.id, exc)
                    else:
                        self.record(job, rec, worker=rec.get("worker"))
                        recorded.add(rec["unit"])
                        if self.on_record is not None:
                            self.on_record(rec, client)
                    fut.release()
        finally:
            self.close_progress()
            for fut in inflight:
                fut.cancel()
        if errors:
            u, exc = errors[0]
            if isinstance(exc, UserError):
                raise exc
            if type(exc).__name__ == "KilledWorker":
                raise UserError(f"unit {u.id}: its worker died each time it ran it ({exc}); check the worker "
                                "logs (memory?), then re-run the same command to resume")
            raise exc
        return recorded >= {u.id for u in pending}
