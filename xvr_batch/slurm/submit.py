"""``xvr-batch reconstruct ARCHIVE -o OUT --nodes N``: submit the run as a Slurm job.

The job runs the same ``reconstruct`` command inside the allocation, with ``--backend torch`` (torchrun
on one node, srun across nodes) or ``--backend mpi`` (srun --mpi=pmi2). Its options travel in a TOML file
in the work directory (``submit.toml``), so the job script stays short and every value is quoted once.
``--dry-run`` prints the script; ``--wait`` follows the job to its end (:func:`xvr_batch.slurm.client.follow_job`).

The job is requeueable, and every run of it reads the same ``submit.toml``. So ``--force-replan`` is
applied once, here, when the job is submitted: the earlier plan is discarded (under the work-directory
lock) and the job's options do not carry the flag, so that a requeued run resumes instead of starting over.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import tomli_w

from xvr_batch.errors import UserError
from xvr_batch.pipeline import Options, check_output_target
from xvr_batch.slurm.client import submit
from xvr_batch.slurm.script import JOB_NAME_MAX, JobSpec, job_name_for, render_job_script, validate_spec

__all__ = ["SubmitOptions", "discard_plan", "job_command", "options_toml", "render_submission", "slurm_log",
           "submit_reconstruct"]

# Options that only make sense on the submitting side, or only once (see the module docstring).
_NOT_IN_JOB = {"archive", "output", "force_replan"}
_JOB_NAME_RE = re.compile(rf"^[A-Za-z0-9._-]{{1,{JOB_NAME_MAX}}}$")


@dataclass
class SubmitOptions:
    """What ``--nodes N`` and the other Slurm flags of ``reconstruct`` ask for."""

    nodes: int = 1
    gpus_per_node: int = 0
    partition: str | None = None
    account: str | None = None
    time: str | None = None
    launcher: str = "torch"
    cpus_per_task: int | None = None
    mem: str | None = None
    extra_directives: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    job_name: str | None = None
    """``--job-name``; by default derived from the archive's file name (:func:`job_name_for`)."""


def slurm_log(output: str | Path, job_id: str) -> str:
    """The job's log, beside the output (the work directory is removed once the output is complete)."""
    out = Path(output).resolve()
    return str(out.with_name(f"{out.name}.slurm-{job_id}.log"))


def options_toml(opts: Options) -> str:
    """The job's ``submit.toml``: the options that differ from the defaults, as ``[reconstruct]`` keys."""
    defaults = Options(archive="", output="")
    table: dict[str, Any] = {}
    for f in fields(Options):
        value = getattr(opts, f.name)
        if f.name in _NOT_IN_JOB or value is None or value == getattr(defaults, f.name):
            continue
        table[f.name.replace("_", "-")] = value
    header = "# Options of the submitted reconstruct run (written by xvr-batch; keys mirror the flags).\n"
    return header + tomli_w.dumps({"reconstruct": table})


def _launcher_executable() -> str:
    exe = Path(sys.executable).parent / "xvr-batch"
    return str(exe) if exe.exists() else (shutil.which("xvr-batch") or "xvr-batch")


def job_command(opts: Options, sub: SubmitOptions, config_path: Path) -> list[str]:
    """The command every rank of the job runs."""
    backend = "torch" if sub.launcher == "torch" else "mpi"
    return [_launcher_executable(), "reconstruct", str(Path(opts.archive).resolve()), "-o",
            str(Path(opts.output).resolve()), "--config", str(config_path), "--backend", backend, "-q"]


def _job_name(opts: Options, sub: SubmitOptions) -> str:
    if sub.job_name is None:
        return job_name_for(Path(opts.archive).stem)
    if not _JOB_NAME_RE.match(sub.job_name):
        raise UserError(f"--job-name {sub.job_name!r}: use 1 to {JOB_NAME_MAX} letters, digits and . _ - only")
    return sub.job_name


def render_submission(opts: Options, sub: SubmitOptions) -> tuple[str, str, Path]:
    """(job script, options TOML, work directory) for this run. Pure apart from resolving paths."""
    if sub.launcher not in ("torch", "mpi"):
        raise UserError(f"--launcher {sub.launcher!r}: choose torch or mpi")
    opts = Options(**asdict(opts))
    opts.workdir = str(opts.resolved_workdir().resolve())
    opts.output = str(Path(opts.output).resolve())
    wd = Path(opts.workdir)
    spec = JobSpec(
        job_name=_job_name(opts, sub), nodes=sub.nodes,
        gpus_per_node=sub.gpus_per_node, partition=sub.partition, account=sub.account, time=sub.time,
        cpus_per_task=sub.cpus_per_task, mem=sub.mem, output=slurm_log(opts.output, "%j"),
        extra_directives=list(sub.extra_directives), setup=list(sub.setup), workdir=str(Path.cwd()),
        env={"XVR_PYTHON": sys.executable},
    )
    validate_spec(spec)
    script = render_job_script(spec, job_command(opts, sub, wd / "submit.toml"), launcher=sub.launcher)
    return script, options_toml(opts), wd


def discard_plan(workdir: Path) -> bool:
    """``--force-replan`` at submission: drop the plan in ``workdir`` (under its lock); True if there was one.

    Only ``manifest.json`` is removed: the job's first run then plans afresh on its own node (with the
    device it really has), and planning removes the old journal and parts. A live run holding the
    lock is refused with a :class:`UserError` naming it.
    """
    from xvr_batch.durable import fsync_dir
    from xvr_batch.workdir import WorkDir

    wd = WorkDir(workdir)
    if not wd.exists():
        return False
    with wd.lock():
        try:
            os.unlink(wd.manifest_path)
        except FileNotFoundError:
            return False
        fsync_dir(wd.path)
    return True


def submit_reconstruct(opts: Options, sub: SubmitOptions, dry_run: bool = False,
                       echo: Callable[[str], None] = print) -> str | None:
    """Render and (unless ``dry_run``) submit; returns the job id."""
    check_output_target(opts)
    script, toml, wd = render_submission(opts, sub)
    if dry_run:
        echo(script.rstrip("\n"))
        echo(f"# --- {wd / 'submit.toml'} ---")
        echo(toml.rstrip())
        if opts.force_replan:
            echo(f"# --force-replan: on submission the earlier plan in {wd} is discarded (not in a dry run)")
        return None
    if not shutil.which("sbatch"):
        raise UserError("sbatch not found: --nodes submits a Slurm job; run on a login node, or drop --nodes "
                        "to run here")
    if opts.force_replan and discard_plan(wd):
        echo(f"--force-replan: discarded the earlier plan in {wd}; the job plans afresh")
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "submit.toml").write_text(toml)
    job_id = submit(script, str(wd))
    echo(f"submitted Slurm job {job_id}; work directory {wd}; log {slurm_log(opts.output, job_id)}")
    echo(f"follow it with: xvr-batch status {wd}")
    return job_id
