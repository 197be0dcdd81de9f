"""``xvr-batch reconstruct ARCHIVE -o OUT --nodes N``: submit the run as a Slurm job.

The job runs the same ``reconstruct`` command inside the allocation, with ``--backend torch`` (torchrun
on one node, srun across nodes) or ``--backend mpi`` (srun --mpi=pmi2). Its options travel in a TOML file
in the work directory (``submit.toml``), so the job script stays short and every value is quoted once.
``--dry-run`` prints the script; ``--wait`` follows the job to its end, with a progress bar fed from the
manifest. The job script comes from the one builder in :mod:`xvr_batch.backends.slurm`.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from xvr_batch.backends.slurm import JobSpec, job_state, render_job_script, submit, validate_spec
from xvr_batch.errors import UserError
from xvr_batch.pipeline import Options

__all__ = ["slurm_log", "SubmitOptions", "job_command", "render_submission", "submit_reconstruct", "follow_job"]

_FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY",
          "BOOT_FAIL", "DEADLINE", "UNKNOWN"}
# Options that only make sense on the submitting side.
_LOCAL_ONLY = {"archive", "output"}


@dataclass
class SubmitOptions:
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


def slurm_log(output: str | Path, job_id: str) -> str:
    """The job's log, beside the output (the work directory is removed once the output is complete)."""
    out = Path(output).resolve()
    return str(out.with_name(f"{out.name}.slurm-{job_id}.log"))


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {value!r} to TOML")


def _options_toml(opts: Options) -> str:
    lines = ["# Options of the submitted reconstruct run (written by xvr-batch; keys mirror the flags)."]
    lines.append("[reconstruct]")
    defaults = Options(archive="", output="")
    for f in fields(Options):
        value = getattr(opts, f.name)
        if f.name in _LOCAL_ONLY or value is None or value == getattr(defaults, f.name):
            continue
        lines.append(f"{f.name.replace('_', '-')} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _launcher_executable() -> str:
    exe = Path(sys.executable).parent / "xvr-batch"
    return str(exe) if exe.exists() else (shutil.which("xvr-batch") or "xvr-batch")


def job_command(opts: Options, sub: SubmitOptions, config_path: Path) -> list[str]:
    backend = "torch" if sub.launcher == "torch" else "mpi"
    return [_launcher_executable(), "reconstruct", str(Path(opts.archive).resolve()), "-o",
            str(Path(opts.output).resolve()), "--config", str(config_path), "--backend", backend, "-q"]


def render_submission(opts: Options, sub: SubmitOptions) -> tuple[str, str, Path]:
    """(job script, options TOML, work directory) for this run. Pure apart from resolving paths."""
    if sub.launcher not in ("torch", "mpi"):
        raise UserError(f"--launcher {sub.launcher!r}: choose torch or mpi")
    opts = Options(**asdict(opts))
    opts.workdir = str(opts.resolved_workdir().resolve())
    opts.output = str(Path(opts.output).resolve())
    wd = Path(opts.workdir)
    spec = JobSpec(
        job_name=sub.job_name or f"xvr-{Path(opts.archive).stem}"[:60], nodes=sub.nodes,
        gpus_per_node=sub.gpus_per_node, partition=sub.partition, account=sub.account, time=sub.time,
        cpus_per_task=sub.cpus_per_task, mem=sub.mem, output=slurm_log(opts.output, "%j"),
        extra_directives=list(sub.extra_directives), setup=list(sub.setup), workdir=str(Path.cwd()),
        env={"XVR_PYTHON": sys.executable},
    )
    validate_spec(spec)
    script = render_job_script(spec, job_command(opts, sub, wd / "submit.toml"), launcher=sub.launcher)
    return script, _options_toml(opts), wd


def submit_reconstruct(opts: Options, sub: SubmitOptions, dry_run: bool = False,
                       echo: Callable[[str], None] = print) -> str | None:
    """Render and (unless ``dry_run``) submit; returns the job id."""
    from xvr_batch.pipeline import _check_output_target
    _check_output_target(opts)
    script, toml, wd = render_submission(opts, sub)
    if dry_run:
        echo(script)
        echo(f"# --- {wd / 'submit.toml'} ---")
        echo(toml.rstrip())
        return None
    if not shutil.which("sbatch"):
        raise UserError("sbatch not found: --nodes submits a Slurm job; run on a login node, or drop --nodes "
                        "to run here")
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "submit.toml").write_text(toml)
    job_id = submit(script, str(wd))
    echo(f"submitted Slurm job {job_id}; work directory {wd}; log {slurm_log(opts.output, job_id)}")
    echo(f"follow it with: xvr-batch status {wd}")
    return job_id


def follow_job(job_id: str, workdir: Path, output: Path, poll: float = 2.0, progress: bool = True) -> str:
    """Wait for the job to end, showing frames done from the manifest; return the final state."""
    from tqdm import tqdm

    from xvr_batch.workdir import WorkDir
    wd = WorkDir(workdir)
    bar = None
    state = "PENDING"
    try:
        while True:
            state = job_state(job_id) or "UNKNOWN"
            if wd.exists():
                try:
                    st = wd.status()
                except UserError:
                    st = None
                if st is not None:
                    if bar is None:
                        bar = tqdm(total=st["n_frames"], unit="frame", desc=f"job {job_id}", disable=not progress)
                    bar.n = st["frames_done"]
                    bar.set_postfix_str(state.lower())
                    bar.refresh()
            if state.split()[0] in _FINAL or (state == "UNKNOWN" and output.exists()):
                break
            time.sleep(poll)
    finally:
        if bar is not None:
            if output.exists():
                bar.n = bar.total
                bar.refresh()
            bar.close()
    return state
