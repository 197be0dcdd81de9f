"""Execution backends: one small interface (:class:`~xvr_batch.backends.base.Backend`), several implementations."""

from __future__ import annotations

from typing import Any

from xvr_batch.errors import UserError

BACKENDS = ("local",)


def get_backend(name: str, **kwargs: Any):
    """The backend called ``name`` (imported lazily: mpi4py and dask are optional)."""
    if name == "local":
        from xvr_batch.backends.local import LocalBackend
        return LocalBackend(**kwargs)
    raise UserError(f"--backend {name!r}: unknown backend; choose one of {', '.join(BACKENDS)}")
