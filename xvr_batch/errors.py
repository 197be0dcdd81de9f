"""Errors a user can cause.

Every error that a user can fix (bad input, bad flag, a changed archive under a work directory)
is raised as :class:`UserError`. The CLI prints its message as one line and exits with code 2;
``--debug`` adds the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. ``str(err)`` is one line: what, where, what to do."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


#: Exit status of a run that stopped cleanly on request (SIGUSR2/SIGTERM, e.g. a Slurm time-limit warning
#: or a preemption) before it finished. The work directory holds everything done so far; running the same
#: command again resumes. 75 is EX_TEMPFAIL of sysexits.h ("try again later"), so `reconstruct ... && next`
#: does not go on, and the job scripts in slurm/ requeue on it.
EXIT_STOPPED = 75
