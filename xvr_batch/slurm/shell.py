'''The shell code every job script shares, kept here once and spliced into scripts and templates.

:func:`stop_block` returns the block that makes a job stop cleanly and requeue: it traps the stop
signals, passes them on to the running step, waits for the step and decides from its end what the job
does. A script launches its step in the background and hands its pid to the block's ``xvr_finish``::

    <launch line> &
    xvr_finish $!

The launcher section of each script sets, before the block:

* ``XVR_FORWARD``: how to reach the step: ``process`` (kill), ``children`` (the processes torchrun
  started) or ``srun`` (``scancel --signal`` to every task);
* ``XVR_FORWARD_AS``: optional, the signal to send instead of the one received;
* ``XVR_WARN_SIGNAL``: the ``--signal=B:...`` time-limit warning (empty if none);
* ``XVR_REQUEUE``: 1 to requeue the job after a clean stop.

Exit statuses of the step: 0 is done (no requeue); 75 (:data:`xvr_batch.errors.EXIT_STOPPED`) is a
clean stop that can be resumed, and the job is requeued when ``XVR_REQUEUE=1`` and the stop was not a
SIGTERM (``scancel``; a preempted job is requeued by Slurm itself). torchrun and ``srun
--kill-on-bad-exit`` turn a rank's 75 into 1 or 143, so a stop is also recognised by the marker file
``$XVR_STOP_MARKER`` that a stopping rank creates (:mod:`xvr_batch.slurm.stopmark`). Anything else is
a failure: no requeue, and the job exits with that status.

Templates under ``templates/`` hold a marker line (:func:`marker_line`) where a block goes. Unrendered,
that line stops the script with a message, so a copied template never runs without its stop logic;
:func:`splice` puts the blocks in.
'''

from __future__ import annotations

from xvr_batch.slurm.ports import master_port_shell

__all__ = ["BLOCKS", "STOPPED_STATUS", "marker_line", "rendezvous_block", "splice", "stop_block"]

#: The exit status of a clean, resumable stop (the value of :data:`xvr_batch.errors.EXIT_STOPPED`).
STOPPED_STATUS = 75


def stop_block() -> str:
    """Signal traps, the stop marker and ``xvr_finish PID`` (wait, decide, requeue, exit)."""
    s = STOPPED_STATUS
    return f"""\
# ---- Stop signals, exit status and requeue (shared by every xvr-batch job script) -------------
# 0: done. {s}: stopped cleanly and resumable (requeued when XVR_REQUEUE=1). Other: failed.
XVR_STEP_PID=
XVR_STOP_SIGNAL=
# A rank that stops cleanly creates this file: torchrun and srun may not pass its status {s} on.
XVR_STOP_MARKER="${{SLURM_SUBMIT_DIR:-$PWD}}/.xvr-batch-stopped.${{SLURM_JOB_ID:-none}}"
export XVR_STOP_MARKER
rm -f -- "$XVR_STOP_MARKER"
xvr_forward() {{
    XVR_STOP_SIGNAL=$1
    echo "xvr-batch job: got SIG$1, asking the step to finish its current unit and stop" >&2
    if [ -z "$XVR_STEP_PID" ]; then return 0; fi
    case $XVR_FORWARD in
        srun) scancel --signal="${{XVR_FORWARD_AS:-$1}}" "$SLURM_JOB_ID" ;;
        children) pkill --signal "${{XVR_FORWARD_AS:-$1}}" -P "$XVR_STEP_PID" ;;
        *) kill -s "${{XVR_FORWARD_AS:-$1}}" "$XVR_STEP_PID" ;;
    esac || echo "xvr-batch job: could not pass SIG$1 on to the step" >&2
}}
for XVR_SIG in $XVR_WARN_SIGNAL USR2 TERM; do
    trap "xvr_forward $XVR_SIG" "$XVR_SIG"
done
xvr_finish() {{
    XVR_STEP_PID=$1
    if [ -n "$XVR_STOP_SIGNAL" ]; then xvr_forward "$XVR_STOP_SIGNAL"; fi
    # `wait` also returns, with a status above 128, whenever a trapped signal arrives: wait again
    # until the step has really ended.
    while :; do
        wait "$XVR_STEP_PID" && XVR_RC=0 || XVR_RC=$?
        if ! kill -0 "$XVR_STEP_PID" 2>/dev/null; then break; fi
    done
    if [ "$XVR_RC" -ne 0 ] && [ -e "$XVR_STOP_MARKER" ]; then XVR_RC={s}; fi
    rm -f -- "$XVR_STOP_MARKER"
    if [ "$XVR_RC" -eq {s} ]; then
        echo "xvr-batch job: the step stopped cleanly (exit status {s}); running it again resumes" >&2
        if [ "$XVR_REQUEUE" = 1 ] && [ "$XVR_STOP_SIGNAL" != TERM ]; then
            echo "xvr-batch job: requeueing job $SLURM_JOB_ID; the next run resumes where this one stopped" >&2
            if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
            echo "xvr-batch job: scontrol requeue $SLURM_JOB_ID failed; submit the job again to resume" >&2
        fi
    fi
    exit "$XVR_RC"
}}
"""


def rendezvous_block() -> str:
    """``MASTER_ADDR`` (the job's first node) and ``MASTER_PORT`` (:mod:`xvr_batch.slurm.ports`)."""
    return f"""\
# torch.distributed rendezvous: the first node of the job, and a port derived from the job id.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT={master_port_shell()}
export MASTER_ADDR MASTER_PORT
"""


#: The blocks a template may ask for, by name.
BLOCKS = {"stop-requeue": stop_block, "rendezvous": rendezvous_block}


def marker_line(name: str) -> str:
    """The template line that :func:`splice` replaces by block ``name``; unrendered, it exits 2."""
    if name not in BLOCKS:
        raise KeyError(name)
    return (f'echo "xvr-batch: unrendered template (no {name} block); get a complete script with: '
            f'python -m xvr_batch.slurm NAME (see slurm/README.md)" >&2; exit 2  # @xvr-batch-block {name}')


def splice(text: str) -> str:
    """``text`` with every marker line replaced by its block (other lines unchanged)."""
    markers = {marker_line(name): name for name in BLOCKS}
    out = []
    for line in text.splitlines(keepends=True):
        name = markers.get(line.rstrip("\n"))
        out.append(BLOCKS[name]() if name is not None else line)
    return "".join(out)
