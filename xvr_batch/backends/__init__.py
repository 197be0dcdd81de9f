"""Execution backends: one interface (:class:`~xvr_batch.backends.base.Backend`), several implementations.

``local`` (default), ``torch`` (torch.distributed under torchrun/srun), ``mpi`` (mpi4py under
mpiexec/srun), ``dask`` (LocalCluster or an existing scheduler) and ``dask-slurm`` (dask-jobqueue
SLURMCluster). See docs/DISTRIBUTED.md. :func:`xvr_batch.driver.run` drives any of them: the launched
backends (``torch``, ``mpi``) run the same command on every rank, and only the driver rank plans,
journals and finalises.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from xvr_batch.errors import UserError

if TYPE_CHECKING:
    from xvr_batch.backends.base import Backend

BACKENDS = ("local", "torch", "mpi", "dask", "dask-slurm")

#: Command-line options that configure a backend (see :func:`backend_kwargs`), by backend.
_BACKEND_OPTIONS = {
    "workers": ("dask",),
    "scheduler": ("dask",),
    "gpus_per_worker": ("dask", "dask-slurm"),
    "nodes": ("dask-slurm",),
    "gpus_per_node": ("dask-slurm",),
}


def get_backend(name: str, **kwargs: Any) -> "Backend":
    """The backend called ``name`` (imported lazily: mpi4py and dask are optional)."""
    if name == "local":
        from xvr_batch.backends.local import LocalBackend
        return LocalBackend(**kwargs)
    if name == "torch":
        from xvr_batch.backends.torchdist import TorchBackend
        return TorchBackend(**kwargs)
    if name == "mpi":
        from xvr_batch.backends.mpi import MPIBackend
        return MPIBackend(**kwargs)
    if name in ("dask", "dask-slurm"):
        from xvr_batch.backends.daskbackend import DaskBackend
        return DaskBackend(slurm=name == "dask-slurm", **kwargs)
    raise UserError(f"--backend {name!r}: unknown backend; choose one of {', '.join(BACKENDS)}")


def backend_kwargs(name: str, options: dict, log: Callable[[str], None] | None = None) -> dict:
    """The keyword arguments for ``get_backend(name)`` taken from command-line ``options``.

    Only the backend options (``workers``, ``scheduler``, ``gpus_per_worker``, ``nodes``,
    ``gpus_per_node``) are looked at; one given for a backend that does not use it is refused.
    """
    if name not in BACKENDS:
        raise UserError(f"--backend {name!r}: unknown backend; choose one of {', '.join(BACKENDS)}")
    out: dict[str, Any] = {}
    for key, users in _BACKEND_OPTIONS.items():
        value = options.get(key)
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if name not in users:
            raise UserError(f"{flag} applies to --backend {' or '.join(users)}, not --backend {name}")
        out[key] = value
    if name == "dask" and out.get("scheduler") and out.get("workers"):
        raise UserError("--workers starts a LocalCluster and --scheduler uses an existing one: give only one")
    if log is not None:
        out["log"] = log
    return out


def backend_options(f):
    """Click options of ``reconstruct`` that choose and configure the backend."""
    import click

    opts = [
        click.option("--backend", type=click.Choice(BACKENDS), default="local", show_default=True,
                     help="Where units run: local (this process), torch (under torchrun/srun), mpi (under "
                          "mpiexec/srun), dask (LocalCluster or --scheduler), dask-slurm (SLURMCluster). "
                          "See docs/DISTRIBUTED.md."),
        click.option("--workers", type=click.IntRange(min=1), default=None,
                     help="dask: worker processes of the LocalCluster [one per GPU, else 1]."),
        click.option("--scheduler", default=None, metavar="ADDRESS",
                     help="dask: use the existing scheduler at ADDRESS (tcp://host:8786) instead of a LocalCluster."),
        click.option("--gpus-per-worker", type=click.IntRange(min=0), default=None,
                     help="dask: GPU resource each worker owns and each unit reserves [1 on CUDA, else 0]."),
        click.option("--nodes", type=click.IntRange(min=1), default=None,
                     help="Submit to Slurm on N nodes (sbatch; see --launcher, --dry-run, --wait); with "
                          "--backend dask-slurm: worker jobs (nodes) of the SLURMCluster."),
        click.option("--gpus-per-node", type=click.IntRange(min=0), default=None,
                     help="With --nodes: GPUs per node, one process (or dask worker) each [0: CPU]."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f
