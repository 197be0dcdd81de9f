"""Shared fixtures: small real archives on disk and a tiny checkpoint, so pipeline tests stay fast.

Also: ``run_cli`` (the command line in-process), and under ``CI=true`` a skip is a failure unless the
test is marked ``@pytest.mark.may_skip_in_ci(reason=...)``.
"""

from __future__ import annotations

import contextlib
import hashlib
from contextlib import contextmanager
import io
import os
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401  (the output is zstd-compressed)
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: The shared reference data (fixtures/xfusion_parity_small.pt, ...): $XVR_SHARED, else ../shared.
SHARED = Path(os.environ.get("XVR_SHARED", REPO.parent / "shared"))


# ------------------------------------------------------------------------------------------ CI: no silent skips

def in_ci() -> bool:
    """True when the tests run on CI (``CI=true``, as GitHub Actions, GitLab and .ci/run set it)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers",
        "may_skip_in_ci(reason): this test may skip on CI's machine too, for the reason given (e.g. root "
        "that cannot drop privileges); without it, a skip under CI=true is reported as a failure")


def _skip_reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:  # (path, line, "Skipped: why")
        where = f" ({lr[0]}:{lr[1]})"
        return str(lr[2]).removeprefix("Skipped: ") + where
    return str(lr)


def _fail_instead_of_skip(report, what: str) -> None:
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true, which needs every service and the shared fixture "
                       f"(a legitimate skip takes @pytest.mark.may_skip_in_ci(reason=...)): {what}: "
                       f"{_skip_reason(report)}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)  # outermost: runs after the xfail plugin has marked its reports
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not in_ci():
        return
    marker = item.get_closest_marker("may_skip_in_ci")
    if marker is not None and (marker.kwargs.get("reason") or marker.args):
        return
    _fail_instead_of_skip(report, f"{item.nodeid} ({report.when})"
                          + (" [may_skip_in_ci needs a reason]" if marker is not None else ""))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_make_collect_report(collector):
    """A module-level skip (``pytest.importorskip`` at import time, ``allow_module_level``) fails in CI too."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and in_ci():
        _fail_instead_of_skip(report, f"collecting {report.nodeid}")


# ------------------------------------------------------------------------------------------ the CLI in-process

@dataclass
class Result:
    """What a command run through :func:`run_cli` left: its exit code, stdout and stderr."""
    code: int
    out: str
    err: str


@pytest.fixture
def run_cli(monkeypatch):
    """``run_cli(*args) -> Result``: run ``xvr_batch.cli.main(args)`` in this process.

    ``main`` exits with ``SystemExit`` (caught: its code; a normal return is 0). stdout and stderr are
    captured separately; an exception that escapes ``main`` (a bug: the real process would print a
    traceback and exit 1) is returned as code 1 with the traceback on ``err``. ``sys.argv``, XVR_DEBUG
    and the warnings formatter that ``main`` installs are restored afterwards.
    """
    from xvr_batch.cli import main

    def run(*args, cwd=None) -> Result:
        argv = [str(a) for a in args]
        monkeypatch.setattr(sys, "argv", ["xvr-batch", *argv])
        monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
        monkeypatch.delenv("XVR_DEBUG", raising=False)
        out, err = io.StringIO(), io.StringIO()
        code = 0
        with contextlib.ExitStack() as stack:
            if cwd is not None:
                stack.enter_context(contextlib.chdir(cwd))
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(contextlib.redirect_stderr(err))
            try:
                main(argv)
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:  # sys.exit("message"): the interpreter prints it and exits 1
                    print(exc.code, file=sys.stderr)
                    code = 1
            except Exception:  # noqa: BLE001
                traceback.print_exc()
                code = 1
        return Result(code, out.getvalue(), err.getvalue())

    return run


def make_archive(path: Path, n: int = 40, lr_shape=(8, 12), hr_index=(3, 11, 30), seed: int = 0,
                 dtype=np.uint16, calib: bool = True, gt: bool = False) -> Path:
    """A small archive with a moving blob, noisy LR frames, HR key frames, darks and flats."""
    rng = np.random.default_rng(seed)
    h, w = lr_shape
    hh, ww = 4 * h, 4 * w
    yy, xx = np.mgrid[0:hh, 0:ww]
    truth = np.empty((n, hh, ww), np.float32)
    for t in range(n):
        cy, cx = hh / 2 + 0.3 * hh * np.sin(t / 7), ww * (0.2 + 0.6 * t / n)
        truth[t] = 1500 + 1200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (hh / 6) ** 2))
    lr = truth.reshape(n, h, 4, w, 4).mean(axis=(2, 4)) * 0.25 + 90
    lr = rng.poisson(lr).astype(dtype)
    idx = np.asarray(hr_index, dtype=np.int64)
    hr = rng.poisson(truth[idx]).astype(dtype)
    with h5py.File(path, "w") as f:
        f["/exchange/data_lr"] = lr
        f["/exchange/data_hr"] = hr
        f["/exchange/hr_index"] = idx
        if calib:
            f["/exchange/data_dark_lr"] = np.full((4, h, w), 90, dtype)
            f["/exchange/data_white_lr"] = np.full((4, h, w), 90 + 700, dtype)
            f["/exchange/data_dark_hr"] = np.full((4, hh, ww), 10, dtype)
            f["/exchange/data_white_hr"] = np.full((4, hh, ww), 3000, dtype)
        if gt:
            f["/exchange/data_gt"] = truth
    return path


@pytest.fixture
def archive(tmp_path) -> Path:
    return make_archive(tmp_path / "archive.h5")


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from xvr_batch.model import SwinXVR, preset, save_checkpoint
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    save_checkpoint(path, SwinXVR(preset("tiny", window=4)).eval())
    return path


@pytest.fixture(scope="session")
def tiny_centre_weights(tmp_path_factory) -> Path:
    from xvr_batch.model import SwinXVR, preset, save_checkpoint
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "tiny_centre.pt"
    save_checkpoint(path, SwinXVR(preset("tiny", window=4, head="centre")).eval())
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_data(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["/exchange/data"][()]


def cli(*args, check: bool = False, timeout: float = 300, env: dict | None = None, cwd=None):
    """Run ``python -m xvr_batch ARGS`` as a real process."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "xvr_batch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"xvr-batch {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def to_xfusion_keys(sd: dict) -> dict:
    """Inverse of our key mapping, used to check that the mapping is general (any depth/NL/width)."""
    inv = {}
    for k, v in sd.items():
        k2 = (k.replace("lr_conv.", "conv_first.").replace("hr_conv0.", "conv_first_hi.")
              .replace("hr_conv1.", "conv1_hi.").replace("hr_conv2.", "conv2_hi.")
              .replace("head_conv.", "conv_before_upsample.0."))
        if k2.startswith("stages."):
            parts = k2.split(".")
            if parts[2] == "blocks":
                k2 = f"layers.{parts[1]}.residual_group.blocks." + ".".join(parts[3:])
                k2 = k2.replace("rel_bias_table", "relative_position_bias_table")
            else:
                k2 = f"layers.{parts[1]}." + ".".join(parts[2:])
        if k2.startswith("upsample."):
            parts = k2.split(".")
            k2 = f"upsample.{int(parts[1]) * 2}.{parts[2]}"
        inv[k2] = v
    return inv


@contextmanager
def tmpfs(path: Path, size: str):
    """A real tmpfs of ``size`` (e.g. "300k") mounted at ``path`` for the block (root only; skips otherwise)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ------------------------------------------------------------------------------------------ refine steps A/B

@pytest.fixture
def with_and_without(tmp_path, monkeypatch):
    """``with_and_without(arc, step, without)``: reconstruct ``arc`` with every refine step (units of 128 frames,
    batch 4, and units of 9, batch 3), then with ``REFINE_STEPS = without``; checks which runs record ``step`` in
    their settings -> (outputs, mean PSNRs between key frames), each keyed "with", "with_units", "without"."""
    import xvr_batch.refine as refine
    from xvr_batch.driver import reconstruct
    from xvr_batch.evaluate import evaluate
    from xvr_batch.pipeline import Options

    def run(arc, step: str, without: tuple[str, ...]):
        data, psnr = {}, {}
        for name, unit, batch in (("with", 128, 4), ("with_units", 9, 3), ("without", 128, 4)):
            if name == "without":
                monkeypatch.setattr(refine, "REFINE_STEPS", without)
            out = tmp_path / f"{name}.h5"
            reconstruct(Options(archive=str(arc), output=str(out), overwrite=True, force_replan=True,
                                unit_frames=unit, batch=batch), progress=False)
            with h5py.File(out, "r") as f:
                data[name] = f["/exchange/data"][...]
                assert (f'"{step}"' in f["/process/xvr_batch"].attrs["settings"]) == (name != "without")
            psnr[name] = evaluate(str(out), str(arc), frames="between")["methods"]["swin_xvr"]["mean_psnr"]
        return data, psnr

    return run
