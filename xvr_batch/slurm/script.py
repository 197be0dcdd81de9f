"""The Slurm job-script builder: :class:`JobSpec`, its validation, and :func:`render_job_script`.

``xvr-batch reconstruct archive.h5 -o out.h5 --nodes 8`` turns its options into a :class:`JobSpec`
and renders a batch script with :func:`render_job_script` (``--dry-run`` prints it).

Rendering is pure and safe by construction:

* every ``#SBATCH`` value is checked against a strict character set (no quoting is possible there:
  sbatch reads those lines itself), so no value can add a line or a directive;
* every word of the command, every environment value and the work directory are shell-quoted with
  :func:`shlex.quote`; only ``JobSpec.setup`` lines are written verbatim, because they are trusted
  site configuration (``module load cuda``), not user input.

Stopping early. The script runs the program as a background step and waits for it, so the batch
shell itself can take Slurm's signals: ``--signal=B:USR2@120`` makes Slurm send SIGUSR2 to the batch
shell 120 s before the time limit, and SIGTERM arrives on preemption or ``scancel``. The shared block
of :mod:`xvr_batch.slurm.shell` passes either signal on to the step; xvr-batch finishes the unit it is
on and exits with status 75, and the script requeues a requeueable job on that status. The same block
is spliced into every template under ``templates/``.
"""

from __future__ import annotations

import os
import re
import shlex
import textwrap
from dataclasses import dataclass, field
from typing import Optional, Sequence

from xvr_batch.errors import UserError
from xvr_batch.slurm.shell import rendezvous_block, stop_block

__all__ = ["LAUNCHERS", "JobSpec", "job_name_for", "render_job_script", "sbatch_directives", "validate_spec"]

#: Launchers understood by :func:`render_job_script`.
LAUNCHERS = ("torch", "mpi", "none", "dask-worker")

#: Longest job name :func:`job_name_for` derives.
JOB_NAME_MAX = 64

# Characters allowed in a #SBATCH value: enough for paths, %j patterns, gres and signal specs,
# nothing a shell or sbatch's own line parser would treat specially.
_DIRECTIVE_CHARS = r"A-Za-z0-9_.,:=@%/+-"
_DIRECTIVE_TOKEN_RE = re.compile(rf"^[{_DIRECTIVE_CHARS}]+$")
_NOT_DIRECTIVE_CHAR_RE = re.compile(rf"[^{_DIRECTIVE_CHARS}]")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.,-]+$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MEM_RE = re.compile(r"^[0-9]+[KMGTkmgt]?$")
_TIME_RE = re.compile(
    r"^(?:(?P<days>[0-9]+)-(?P<dhours>[0-9]{1,2})|(?P<hours>[0-9]+)):(?P<min>[0-9]{2}):(?P<sec>[0-9]{2})$"
)
_SIGNAL_RE = re.compile(r"^(?:(?P<where>[RB]{1,2}):)?(?:SIG)?(?P<name>[A-Z][A-Z0-9]*)(?:@(?P<secs>[0-9]+))?$")
_PYTHON_RE = re.compile(r"^python[0-9.]*$")
_UNSAFE_NAME_CHAR_RE = re.compile(r"[^A-Za-z0-9._-]")


def job_name_for(stem: str, prefix: str = "xvr-") -> str:
    """A job name Slurm and ``#SBATCH`` accept, derived from a file name stem.

    Every character outside ``[A-Za-z0-9._-]`` becomes ``_``; the result is at most
    :data:`JOB_NAME_MAX` characters and never empty (``run 42 (test)`` -> ``xvr-run_42__test_``).
    """
    name = _UNSAFE_NAME_CHAR_RE.sub("_", prefix + stem)[:JOB_NAME_MAX]
    return name if name.strip("_") else "xvr-batch"



@dataclass
class JobSpec:
    """What to ask Slurm for. Every field is checked by :func:`validate_spec` before rendering.

    ``setup`` lines (``module load cuda``, ``source /opt/site/env.sh``) are written into the script
    verbatim: they are trusted site configuration from a config file, never command-line input.
    Everything else is either checked against a strict pattern (``#SBATCH`` values) or
    shell-quoted (environment values, the work directory, the command).
    """

    job_name: str = "xvr-batch"
    nodes: int = 1
    gpus_per_node: int = 0  # 0: a CPU job, no --gres line
    ntasks_per_node: Optional[int] = None  # default max(gpus_per_node, 1): one task per GPU
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None  # per node, e.g. "64G"
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None  # HH:MM:SS or D-HH:MM:SS
    output: Optional[str] = None  # log path pattern; default "xvr-%j.out" in the submit directory
    signal: Optional[str] = "B:USR2@120"  # early warning before the time limit, to the batch shell
    requeue: bool = True
    extra_directives: list[str] = field(default_factory=list)  # each "#SBATCH <value>", e.g. "--qos=high"
    env: dict[str, str] = field(default_factory=dict)  # exported in the script, values shell-quoted
    setup: list[str] = field(default_factory=list)  # trusted site lines, written verbatim
    workdir: Optional[str] = None  # the script cds into it

    @property
    def tasks_per_node(self) -> int:
        """Tasks per node: ``ntasks_per_node`` if set, else one per GPU (at least one)."""
        if self.ntasks_per_node is not None:
            return self.ntasks_per_node
        return max(self.gpus_per_node, 1)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _check_line_safe(what: str, value: str) -> None:
    """Refuse characters that would end a script line or cannot be stored in a script."""
    if "\n" in value or "\r" in value:
        raise UserError(f"{what} {value!r} contains a line break; it must be a single line")
    if "\0" in value:
        raise UserError(f"{what} {value!r} contains a NUL character")


def _check_directive_token(what: str, value: str, allow_spaces: bool = False) -> None:
    """A value that goes on a ``#SBATCH`` line: one line, only plain characters."""
    if not isinstance(value, str):
        raise UserError(f"{what} must be a string, not {type(value).__name__}")
    _check_line_safe(what, value)
    words = value.split(" ") if allow_spaces else [value]
    for word in words:
        if not _DIRECTIVE_TOKEN_RE.match(word):
            bad = sorted(set(_NOT_DIRECTIVE_CHAR_RE.findall(word)))
            detail = f"characters {''.join(bad)!r} are" if bad else "an empty word is"
            raise UserError(
                f"{what} {value!r} is not allowed in an #SBATCH line: {detail} not allowed "
                "(letters, digits and _.,:=@%/+- only)"
            )


def _check_quotable(what: str, value: str) -> None:
    """A path for an ``#SBATCH`` line, double-quoted when needed (sbatch reads the quotes; no shell does)."""
    if not isinstance(value, str) or not value:
        raise UserError(f"{what} must be a non-empty string")
    _check_line_safe(what, value)
    if '"' in value or "\\" in value or not value.isprintable():
        raise UserError(f"{what} {value!r} is not allowed in an #SBATCH line: no double quotes, backslashes or "
                        "control characters")


def _directive_path(value: str) -> str:
    """``value`` as it goes on an ``#SBATCH`` line: bare if plain, else in double quotes."""
    return value if _DIRECTIVE_TOKEN_RE.match(value) else f'"{value}"'


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise UserError(f"{what} {value!r} is not a valid Slurm name (letters, digits and _.,- only)")


def _check_time(value: str) -> None:
    match = _TIME_RE.match(value) if isinstance(value, str) else None
    if match is None:
        raise UserError(f"time limit {value!r} is not HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00 or 1-12:00:00)")
    hours = int(match["dhours"] if match["days"] is not None else match["hours"])
    minutes, seconds = int(match["min"]), int(match["sec"])
    if match["days"] is not None and hours > 23:
        raise UserError(f"time limit {value!r}: hours must be 0-23 in D-HH:MM:SS")
    if minutes > 59 or seconds > 59:
        raise UserError(f"time limit {value!r}: minutes and seconds must be 00-59")
    if int(match["days"] or 0) == 0 and hours == 0 and minutes == 0 and seconds == 0:
        raise UserError(f"time limit {value!r} must be longer than zero")


def _check_count(what: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{what} must be an integer >= {minimum}, not {value!r}")


def validate_spec(spec: JobSpec) -> None:
    """Check every field of ``spec``; raise :class:`UserError` (one line) on the first bad one."""
    _check_directive_token("job name", spec.job_name)
    _check_count("nodes", spec.nodes, 1)
    _check_count("GPUs per node", spec.gpus_per_node, 0)
    if spec.ntasks_per_node is not None:
        _check_count("tasks per node", spec.ntasks_per_node, 1)
    if spec.cpus_per_task is not None:
        _check_count("CPUs per task", spec.cpus_per_task, 1)
    if spec.mem is not None and (not isinstance(spec.mem, str) or not _MEM_RE.match(spec.mem)):
        raise UserError(f"memory {spec.mem!r} is not a Slurm size such as 64G or 500M")
    if spec.partition is not None:
        _check_name("partition", spec.partition)
    if spec.account is not None:
        _check_name("account", spec.account)
    if spec.time is not None:
        _check_time(spec.time)
    if spec.output is not None:
        _check_quotable("output log pattern", spec.output)
    if spec.signal is not None:
        if not isinstance(spec.signal, str) or not _SIGNAL_RE.match(spec.signal):
            raise UserError(f"signal {spec.signal!r} is not a Slurm signal spec such as B:USR2@120")
    for directive in spec.extra_directives:
        _check_directive_token("extra #SBATCH directive", directive, allow_spaces=True)
        if not directive.startswith("-"):
            raise UserError(f"extra #SBATCH directive {directive!r} must be an option starting with '-'")
    for name, value in spec.env.items():
        if not isinstance(name, str) or not _IDENT_RE.match(name):
            raise UserError(f"environment variable name {name!r} is not a shell identifier")
        if not isinstance(value, str) or "\0" in value:
            raise UserError(f"environment variable {name}: the value must be a string without NUL")
    for line in spec.setup:
        if not isinstance(line, str) or "\0" in line:
            raise UserError(f"setup line {line!r} must be a string without NUL")
    if spec.workdir is not None and (not str(spec.workdir) or "\0" in str(spec.workdir)):
        raise UserError(f"work directory {spec.workdir!r} is empty or contains NUL")


# --------------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------------


def sbatch_directives(spec: JobSpec) -> list[str]:
    """The options of the ``#SBATCH`` lines for ``spec``, in a fixed order (validates ``spec``)."""
    validate_spec(spec)
    options = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.tasks_per_node}"]
    if spec.cpus_per_task is not None:
        options.append(f"--cpus-per-task={spec.cpus_per_task}")
    if spec.gpus_per_node > 0:
        options.append(f"--gres=gpu:{spec.gpus_per_node}")
    if spec.mem is not None:
        options.append(f"--mem={spec.mem}")
    if spec.partition is not None:
        options.append(f"--partition={spec.partition}")
    if spec.account is not None:
        options.append(f"--account={spec.account}")
    if spec.time is not None:
        options.append(f"--time={spec.time}")
    options.append(f"--output={_directive_path(spec.output if spec.output is not None else 'xvr-%j.out')}")
    if spec.signal is not None:
        options.append(f"--signal={spec.signal}")
    if spec.requeue:
        # A requeued run appends to the log of the earlier runs instead of overwriting it.
        options += ["--requeue", "--open-mode=append"]
    else:
        options.append("--no-requeue")
    options += spec.extra_directives
    return options


def _check_command(command: Sequence[str]) -> list[str]:
    if isinstance(command, (str, bytes)) or not command:
        raise UserError("the job command must be a non-empty list of arguments")
    argv = [os.fspath(arg) if isinstance(arg, os.PathLike) else arg for arg in command]
    for arg in argv:
        if not isinstance(arg, str) or "\0" in arg:
            raise UserError(f"job command argument {arg!r} must be a string without NUL")
    return argv


def _quote_words(words: Sequence[str]) -> str:
    return " ".join(shlex.quote(word) for word in words)


def _stopping_comment(spec: JobSpec, match: Optional[re.Match[str]]) -> list[str]:
    """The comment block that explains preemption, the time limit and requeueing.

    ``match`` is ``spec.signal`` parsed by ``_SIGNAL_RE`` (None without a signal).
    """
    lines = ["#", "# Stopping early (time limit, preemption, scancel)", "# " + "-" * 48]
    if match is None:
        lines.append("# No warning before the time limit is asked for (no --signal line).")
    elif "B" in (match["where"] or ""):
        lines.append(
            f"# {match['secs'] or 60} s before the time limit Slurm sends SIG{match['name']} to this script"
            f" (--signal={spec.signal})."
        )
    else:
        lines.append(f"# --signal={spec.signal} goes to the job steps directly, not to this script.")
    lines += [
        "# The trap below passes SIGUSR2 and SIGTERM (preemption, scancel) on to the running step.",
        "# xvr-batch then finishes the unit it is working on, records it in the manifest and exits",
        "# with status 75 (stopped, resumable); 0 means done, anything else failed.",
    ]
    if spec.requeue:
        lines += [
            "# The job is requeueable (--requeue): Slurm puts it back in the queue after a preemption",
            "# or a node failure, and this script requeues it itself after a clean stop (status 75)",
            "# that SIGTERM did not cause. The next run resumes from the manifest: finished units are skipped.",
        ]
    else:
        lines += [
            "# The job is not requeued (--no-requeue): run the same command again, or",
            "# `xvr-batch resume WORKDIR`, to carry on from the manifest.",
        ]
    return lines


def render_job_script(spec: JobSpec, command: Sequence[str], launcher: str = "torch") -> str:
    """Render a complete batch script that runs ``command`` under ``launcher``.

    ``command`` is an argv list; every element is shell-quoted. Launchers:

    ``"torch"``
        one node: ``python -m torch.distributed.run --standalone`` (torchrun) starts one process per
        task (``ntasks_per_node``, by default one per GPU); several nodes: ``srun`` starts one task
        per GPU on every node, the program reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, and
        MASTER_ADDR (first node) and MASTER_PORT (from the job id) are exported.
    ``"mpi"``
        ``srun --mpi=pmi2``: one MPI rank per task.
    ``"none"``
        the command runs once, on the first node.
    ``"dask-worker"``
        the command is a Dask worker; one per node (with ``srun`` when there are several nodes).
        It is sent SIGTERM, not SIGUSR2, to stop: Dask workers close cleanly on SIGTERM.
    """
    options = sbatch_directives(spec)  # validates spec
    argv = _check_command(command)
    if launcher not in LAUNCHERS:
        raise UserError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")

    tasks = spec.nodes * spec.tasks_per_node
    srun_opts = ["--kill-on-bad-exit=1"]
    if spec.cpus_per_task is not None:
        # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
        srun_opts.append(f"--cpus-per-task={spec.cpus_per_task}")
    forward, forward_as = "process", ""
    prelude: list[str] = []
    if launcher == "torch" and spec.nodes == 1:
        nproc = spec.tasks_per_node
        about = f"torchrun starts {nproc} process(es) on this node; each gets RANK, LOCAL_RANK and WORLD_SIZE."
        # torchrun itself would exit on SIGUSR2, so the signal goes to its worker processes.
        forward = "children"
        python = argv[0] if _PYTHON_RE.match(os.path.basename(argv[0])) else "python3"
        prelude = [
            "# The Python that runs torchrun; set XVR_PYTHON before sbatch to choose another.",
            f'if [ -z "${{XVR_PYTHON:-}}" ]; then XVR_PYTHON={shlex.quote(python)}; fi',
        ]
        launch = (
            '"$XVR_PYTHON" -m torch.distributed.run --standalone --nnodes=1 '
            f"--nproc-per-node={nproc} --no-python {_quote_words(argv)}"
        )
    elif launcher == "torch":
        about = (
            f"srun starts {tasks} processes, {spec.tasks_per_node} per node; each reads its rank from "
            "SLURM_PROCID, the world size from SLURM_NTASKS and its GPU from SLURM_LOCALID."
        )
        forward = "srun"
        prelude = rendezvous_block().rstrip("\n").splitlines()
        launch = f"srun {' '.join(srun_opts)} {_quote_words(argv)}"
    elif launcher == "mpi":
        about = f"srun --mpi=pmi2 starts {tasks} MPI rank(s), {spec.tasks_per_node} per node."
        forward = "srun"
        launch = f"srun --mpi=pmi2 {' '.join(srun_opts)} {_quote_words(argv)}"
    elif launcher == "dask-worker":
        forward_as = "TERM"
        if spec.nodes > 1:
            about = "srun starts one Dask worker command on each node."
            forward = "srun"
            launch = f"srun --ntasks={spec.nodes} --ntasks-per-node=1 {' '.join(srun_opts)} {_quote_words(argv)}"
        else:
            about = "One Dask worker command on this node."
            launch = _quote_words(argv)
    else:
        about = "The command runs once, on the first node of the allocation."
        launch = _quote_words(argv)

    # The warning signal the batch shell itself receives ("B:" in the spec), if any.
    signal_match = _SIGNAL_RE.match(spec.signal) if spec.signal is not None else None
    warn = signal_match["name"] if signal_match and "B" in (signal_match["where"] or "") else ""

    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {option}" for option in options]
    lines += [
        "#",
        f"# xvr-batch job script ({launcher} launcher), written by xvr_batch.slurm.script.",
    ]
    lines += ["# " + part for part in textwrap.wrap(about, 96)]
    lines += _stopping_comment(spec, signal_match)
    lines += ["", "set -e"]
    if spec.workdir is not None:
        lines.append(f"cd -- {shlex.quote(str(spec.workdir))}")
    if spec.setup:
        lines += ["", "# Site setup (from the configuration, written as is)."]
        lines += list(spec.setup)
    if spec.env:
        lines.append("")
        lines += [f"export {name}={shlex.quote(value)}" for name, value in spec.env.items()]
    lines += [
        "",
        "# How stop signals reach the step (see xvr_batch/slurm/shell.py).",
        f"XVR_FORWARD={forward}",
        f"XVR_FORWARD_AS={forward_as}",
        f"XVR_WARN_SIGNAL={warn}",
        f"XVR_REQUEUE={1 if spec.requeue else 0}",
    ]
    if prelude:
        lines += [""] + prelude
    lines += ["", stop_block().rstrip("\n"), "", "# ---- The step " + "-" * 82, f"{launch} &", "xvr_finish $!"]
    return "\n".join(lines) + "\n"

