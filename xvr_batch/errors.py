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
