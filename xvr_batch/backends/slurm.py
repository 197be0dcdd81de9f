"""Slurm submission: one job-script builder, the sbatch templates, and thin sbatch/squeue wrappers.

``xvr-batch reconstruct archive.h5 -o out.h5 --nodes 8`` turns its options into a :class:`JobSpec`,
renders a batch script with :func:`render_job_script` (``--dry-run`` prints it) and submits it with
:func:`submit`; ``--wait`` follows it with :func:`wait_for_job`.

Rendering is pure and safe by construction:

* every ``#SBATCH`` value is checked against a strict character set (no quoting is possible there:
  sbatch reads those lines itself), so no value can add a line or a directive;
* every word of the command, every environment value and the work directory are shell-quoted with
  :func:`shlex.quote`; only ``JobSpec.setup`` lines are written verbatim, because they are trusted
  site configuration (``module load cuda``), not user input.

Stopping early. The script runs the program as a background step and ``wait``\\ s for it, so the
batch shell itself can take Slurm's signals: ``--signal=B:USR2@120`` makes Slurm send SIGUSR2 to the
batch shell 120 s before the time limit, and SIGTERM arrives on preemption or ``scancel``. A trap
passes either signal on to the step (through ``kill``, ``pkill -P`` for torchrun's workers, or
``scancel --signal`` for srun steps); xvr-batch then finishes the unit it is on and exits. If it
exits cleanly after the time-limit warning and the job is requeueable, the script requeues the
job, and the next run resumes from the manifest. The same shell code (:data:`SIGNAL_BLOCK`,
:data:`WAIT_BLOCK`) is in every template under ``slurm/``.
"""

from __future__ import annotations

import os
import re
import shlex
import string
import subprocess
import textwrap
import time as _time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from xvr_batch.errors import UserError

__all__ = [
    "ACTIVE_STATES",
    "LAUNCHERS",
    "SCRIPT_NAME",
    "SIGNAL_BLOCK",
    "WAIT_BLOCK",
    "JobSpec",
    "cancel",
    "job_state",
    "render_job_script",
    "render_template",
    "sbatch_directives",
    "submit",
    "template_names",
    "template_placeholders",
    "templates_dir",
    "validate_spec",
    "wait_for_job",
]

#: Launchers understood by :func:`render_job_script`.
LAUNCHERS = ("torch", "mpi", "none", "dask-worker")

#: File name of the batch script that :func:`submit` writes into the work directory.
SCRIPT_NAME = "job.sbatch"

#: Job states in which a job is still queued, running or on its way out; anything else is final.
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "STOPPED",
        "SIGNALING",
        "STAGE_OUT",
        "RESIZING",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESV_DEL_HOLD",
        "SPECIAL_EXIT",
    }
)

# First port of the range MASTER_PORT is taken from (the job id picks one of 20000 ports).
_MASTER_PORT_BASE = 20000
_MASTER_PORT_SPAN = 20000

# Seconds any one Slurm client command may take before we give up on it.
_CLIENT_TIMEOUT = 60

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
_JOB_ID_RE = re.compile(r"^[0-9]+(?:_[0-9]+)?(?:\.[A-Za-z0-9_]+)?$")
_PYTHON_RE = re.compile(r"^python[0-9.]*$")


# --------------------------------------------------------------------------------------------------
# Shell code shared by every script the builder writes and by every template in slurm/.
# Only upper-case shell variables appear in it, so that it reads the same inside a template, where
# lower-case $names are placeholders. The launcher section of each script sets
#   XVR_FORWARD      how to reach the step: process (kill), children (torchrun's workers) or srun
#   XVR_FORWARD_AS   optional: the signal to send instead of the one received
#   XVR_WARN_SIGNAL  the --signal=B:... warning (empty if none)
#   XVR_REQUEUE      1 to requeue the job after a clean stop on the warning signal
# --------------------------------------------------------------------------------------------------

#: Defines the signal trap; it comes before the step is launched.
SIGNAL_BLOCK = """\
# ---- Pass stop signals on to the running step -------------------------------------------------
XVR_STEP_PID=
XVR_STOP_SIGNAL=
xvr_forward() {
    XVR_STOP_SIGNAL=$1
    echo "xvr-batch job: got SIG$1, asking the step to finish its current unit and stop" >&2
    if [ -z "$XVR_STEP_PID" ]; then return 0; fi
    case $XVR_FORWARD in
        srun) scancel --signal="${XVR_FORWARD_AS:-$1}" "$SLURM_JOB_ID" ;;
        children) pkill --signal "${XVR_FORWARD_AS:-$1}" -P "$XVR_STEP_PID" ;;
        *) kill -s "${XVR_FORWARD_AS:-$1}" "$XVR_STEP_PID" ;;
    esac || echo "xvr-batch job: could not pass SIG$1 on to the step" >&2
}
for XVR_SIG in $XVR_WARN_SIGNAL USR2 TERM; do
    trap "xvr_forward $XVR_SIG" "$XVR_SIG"
done
"""

#: Follows the launch line (which ends with ``&``): waits for the step and maybe requeues.
WAIT_BLOCK = """\
XVR_STEP_PID=$!
if [ -n "$XVR_STOP_SIGNAL" ]; then xvr_forward "$XVR_STOP_SIGNAL"; fi
# `wait` also returns, with a status above 128, whenever a trapped signal arrives: wait again
# until the step has really ended, so that its exit status becomes the job's.
while :; do
    wait "$XVR_STEP_PID" && XVR_RC=0 || XVR_RC=$?
    if ! kill -0 "$XVR_STEP_PID" 2>/dev/null; then break; fi
done
# Stopped cleanly on the time-limit warning: put the job back in the queue to carry on.
if [ "$XVR_REQUEUE" = 1 ] && [ -n "$XVR_STOP_SIGNAL" ] && [ "$XVR_STOP_SIGNAL" = "$XVR_WARN_SIGNAL" ] \\
    && [ "$XVR_RC" -eq 0 ]; then
    echo "xvr-batch job: requeueing job $SLURM_JOB_ID; the next run resumes from the manifest" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$XVR_RC"
"""


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
        _check_directive_token("output log pattern", spec.output)
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
    options.append(f"--output={spec.output if spec.output is not None else 'xvr-%j.out'}")
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
        "# xvr-batch then finishes the unit it is working on, records it in the manifest and exits.",
    ]
    if spec.requeue:
        lines += [
            "# The job is requeueable (--requeue): Slurm puts it back in the queue after a preemption",
            "# or a node failure, and this script requeues it itself after a clean stop on the",
            "# time-limit warning. The next run resumes from the manifest: finished units are skipped.",
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
        prelude = [
            "# torch.distributed rendezvous: the first node of the job, a port derived from the job id.",
            'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
            f"MASTER_PORT=$(({_MASTER_PORT_BASE} + SLURM_JOB_ID % {_MASTER_PORT_SPAN}))",
            "export MASTER_ADDR MASTER_PORT",
        ]
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
        f"# xvr-batch job script ({launcher} launcher), written by xvr_batch.backends.slurm.",
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
        "# How stop signals reach the step (see SIGNAL_BLOCK in xvr_batch/backends/slurm.py).",
        f"XVR_FORWARD={forward}",
        f"XVR_FORWARD_AS={forward_as}",
        f"XVR_WARN_SIGNAL={warn}",
        f"XVR_REQUEUE={1 if spec.requeue else 0}",
    ]
    if prelude:
        lines += [""] + prelude
    lines += ["", SIGNAL_BLOCK.rstrip("\n"), "", "# ---- The step " + "-" * 82, f"{launch} &", WAIT_BLOCK]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Templates (slurm/*.sbatch)
# --------------------------------------------------------------------------------------------------


class _PlaceholderTemplate(string.Template):
    """``$name`` placeholders with lower-case names only.

    Upper-case shell variables (``$SLURM_JOB_ID``, ``${XVR_PYTHON:-}``) and ``$1``, ``$!``, ``$?``
    are left alone, so the templates stay readable shell. ``$$`` becomes ``$`` as in
    :class:`string.Template`; the templates do not use it.
    """

    idpattern = r"[a-z][a-z0-9_]*"
    flags = 0  # case-sensitive


def templates_dir() -> Path:
    """The sbatch templates: ``slurm/`` in a source checkout, else the copy shipped in the package."""
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "slurm"
    if (checkout / "README.md").is_file() and any(checkout.glob("*.sbatch")):
        return checkout
    return package / "templates"


def template_names() -> list[str]:
    """File names of the templates, sorted."""
    return sorted(path.name for path in templates_dir().glob("*.sbatch"))


def _template_path(name: str) -> Path:
    file_name = name if name.endswith(".sbatch") else f"{name}.sbatch"
    path = templates_dir() / file_name
    if "/" in file_name or not path.is_file():
        raise UserError(f"no sbatch template {name!r}; templates: {', '.join(template_names())}")
    return path


def _placeholders_in(line: str) -> list[str]:
    """Placeholder names on one template line, in order; comment lines have none."""
    if line.lstrip().startswith("#") and not line.startswith("#SBATCH"):
        return []  # comments may mention $placeholders; they are left as written
    names = []
    for match in _PlaceholderTemplate.pattern.finditer(line):
        name = match.group("named") or match.group("braced")
        if name and name not in names:
            names.append(name)
    return names


def template_placeholders(name: str) -> dict[str, bool]:
    """The placeholders of template ``name``: ``{placeholder: required}``.

    Placeholders on ``#SBATCH`` lines are optional (the line is left out when they have no value);
    the others, in the script body, are required. Comment lines are never filled in.
    """
    return _placeholders_of(_template_path(name).read_text())


def _placeholders_of(text: str) -> dict[str, bool]:
    result: dict[str, bool] = {}
    for line in text.splitlines():
        for placeholder in _placeholders_in(line):
            result[placeholder] = result.get(placeholder, False) or not line.startswith("#SBATCH")
    return result


def _is_unset(value: object) -> bool:
    return value is None or value is False or value == "" or (isinstance(value, int) and value == 0)


def _directive_value(placeholder: str, value: object) -> str:
    if isinstance(value, int) and value < 0:
        raise UserError(f"{placeholder} must not be negative, not {value}")
    text = str(value)
    if placeholder in ("partition", "account", "qos"):
        _check_name(placeholder, text)
    elif placeholder in ("time", "walltime"):
        _check_time(text)
    else:
        _check_directive_token(placeholder, text)
    return text


def _shell_value(placeholder: str, value: object) -> str:
    """A body value as shell words: each item of a list is one quoted word."""
    items = value if isinstance(value, (list, tuple)) else [value]
    words = [os.fspath(item) if isinstance(item, os.PathLike) else str(item) for item in items]
    if any("\0" in word for word in words):
        raise UserError(f"template value {placeholder}={value!r} contains NUL")
    return _quote_words(words)


def render_template(name: str, **values: object) -> str:
    """Fill the template ``slurm/<name>`` (``.sbatch`` may be left off) with ``values``.

    * On ``#SBATCH`` lines, a value must be a plain token (checked like :class:`JobSpec` fields);
      a line whose placeholder is missing, ``None``, ``""`` or ``0`` is left out, so that
      ``gpus_per_node=0`` renders a CPU job and an unset ``partition`` uses the site default.
    * In the script body every value is shell-quoted; a list becomes several quoted words
      (``extra_args=["--dtype", "uint16"]``). Body placeholders are required. A placeholder
      stands alone in the template, never inside quotes.
    * Comment lines are copied as they are.

    Unknown value names raise :class:`UserError`, as do missing body values.
    """
    path = _template_path(name)
    text = path.read_text()
    known = _placeholders_of(text)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"template {path.name} has no placeholder(s) {', '.join(unknown)}; it has {', '.join(sorted(known))}")
    out: list[str] = []
    missing: list[str] = []
    for line in text.splitlines(keepends=True):
        names = _placeholders_in(line)
        if not names:
            out.append(line)
            continue
        if line.startswith("#SBATCH"):
            if any(_is_unset(values.get(placeholder)) for placeholder in names):
                continue
            filled = {placeholder: _directive_value(placeholder, values[placeholder]) for placeholder in names}
        else:
            absent = [placeholder for placeholder in names if values.get(placeholder) is None]
            missing += [placeholder for placeholder in absent if placeholder not in missing]
            if absent:
                continue
            filled = {placeholder: _shell_value(placeholder, values[placeholder]) for placeholder in names}
        out.append(_PlaceholderTemplate(line).safe_substitute(filled))
    if missing:
        raise UserError(f"template {path.name} needs value(s) for: {', '.join(missing)}")
    return "".join(out)


# --------------------------------------------------------------------------------------------------
# Submission and monitoring
# --------------------------------------------------------------------------------------------------


def _run(args: list[str], cwd: Optional[str] = None) -> subprocess.CompletedProcess[str]:
    """Run a Slurm client command (no shell); a missing program is a :class:`UserError`."""
    try:
        return subprocess.run(
            args, cwd=cwd, capture_output=True, text=True, check=False, timeout=_CLIENT_TIMEOUT
        )
    except FileNotFoundError:
        raise UserError(f"{args[0]} not found: is Slurm installed here and on PATH?") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"{args[0]} did not answer within {_CLIENT_TIMEOUT} s: is slurmctld up?") from None


def _check_job_id(job_id: str) -> str:
    job_id = str(job_id)
    if not _JOB_ID_RE.match(job_id):
        raise UserError(f"{job_id!r} is not a Slurm job id")
    return job_id


def submit(script_text: str, workdir: str, sbatch: str = "sbatch") -> str:
    """Write ``script_text`` to ``workdir/job.sbatch`` and submit it; return the job id.

    sbatch runs in ``workdir``, so relative log paths (the default ``xvr-%j.out``) land there.
    Raises :class:`UserError` with sbatch's message if it refuses the job or is not installed.
    """
    directory = Path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / SCRIPT_NAME
    script.write_text(script_text if script_text.endswith("\n") else script_text + "\n")
    result = _run([sbatch, "--parsable", str(script)], cwd=str(directory))
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit status {result.returncode}"
        raise UserError(f"sbatch refused {script}: {message}")
    first = result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""
    job_id = first.split(";")[0]  # "--parsable" prints "ID" or "ID;CLUSTER"
    if not _JOB_ID_RE.match(job_id):
        raise UserError(f"sbatch printed {result.stdout.strip()!r}, not a job id")
    return job_id


def job_state(job_id: str) -> Optional[str]:
    """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``...), or None once Slurm forgot it.

    Asks ``squeue`` first and falls back to ``scontrol show job``, which still knows jobs that
    finished less than MinJobAge seconds ago.
    """
    job_id = _check_job_id(job_id)
    result = _run(["squeue", "-h", "-j", job_id, "-o", "%T"])
    if result.returncode == 0 and result.stdout.strip():
        return result.stdout.split()[0]
    result = _run(["scontrol", "show", "job", job_id])
    if result.returncode == 0:
        match = re.search(r"\bJobState=(\S+)", result.stdout)
        if match:
            return match.group(1)
    return None


def wait_for_job(
    job_id: str,
    poll: float = 2.0,
    timeout: Optional[float] = None,
    on_poll: Optional[Callable[[Optional[str]], None]] = None,
) -> str:
    """Wait until the job is no longer queued or running; return its final state.

    The final state is the one Slurm reports (``COMPLETED``, ``FAILED``, ``CANCELLED``,
    ``TIMEOUT``, ``PREEMPTED``, ``NODE_FAIL``, ``OUT_OF_MEMORY``...) or ``"UNKNOWN"`` if the job
    has already been purged. A requeued job is followed through its next run. ``on_poll`` is
    called with the state at each poll. Raises :class:`UserError` after ``timeout`` seconds.
    """
    job_id = _check_job_id(job_id)
    deadline = None if timeout is None else _time.monotonic() + timeout
    while True:
        state = job_state(job_id)
        if on_poll is not None:
            on_poll(state)
        if state is None:
            return "UNKNOWN"
        # scontrol may append a reason flag, e.g. "CANCELLED+" or "CANCELLED by 0".
        base = re.split(r"[^A-Z_]", state, maxsplit=1)[0]
        if base not in ACTIVE_STATES:
            return base
        if deadline is not None and _time.monotonic() >= deadline:
            raise UserError(f"Slurm job {job_id} is still {base} after {timeout:g} s")
        _time.sleep(poll)


def cancel(job_id: str, signal: Optional[str] = None, target: str = "batch") -> None:
    """Cancel the job, or only send it ``signal`` (e.g. ``"USR2"``).

    With a signal, ``target`` chooses who gets it: ``"batch"`` (the batch shell, whose trap passes
    it on to the step: the normal way to ask a job to stop early), ``"full"`` (the batch shell and
    every step) or ``"steps"`` (the steps only).
    """
    job_id = _check_job_id(job_id)
    args = ["scancel"]
    if signal is not None:
        match = _SIGNAL_RE.match(signal)
        if match is None or match["where"] or match["secs"]:
            raise UserError(f"signal {signal!r} is not a signal name such as USR2 or TERM")
        args.append(f"--signal={match['name']}")
        flags = {"batch": ["--batch"], "full": ["--full"], "steps": []}
        if target not in flags:
            raise UserError(f"signal target {target!r} must be batch, full or steps")
        args += flags[target]
    args.append(job_id)
    result = _run(args)
    if result.returncode != 0:
        raise UserError(f"scancel {job_id} failed: {' '.join(result.stderr.split()) or result.returncode}")

