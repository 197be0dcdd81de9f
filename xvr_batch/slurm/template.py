"""The sbatch templates shipped in ``xvr_batch/slurm/templates/`` (``slurm/`` in a checkout links there).

A template is a shell script with lower-case ``$placeholders`` and marker lines where the shared blocks
of :mod:`xvr_batch.slurm.shell` go (the stop/requeue logic, the rendezvous). :func:`render_template`
fills the placeholders and splices the blocks; :func:`template_text` only splices, for a script to edit
by hand. From a shell::

    python -m xvr_batch.slurm reconstruct-multinode-srun-torch > my-job.sbatch

An unrendered template stops at its first marker line with a message (exit status 2).
"""

from __future__ import annotations

import os
import string
import sys
from pathlib import Path
from typing import Optional, Sequence

from xvr_batch.errors import UserError
from xvr_batch.slurm.script import _check_directive_token, _check_name, _check_time, _quote_words
from xvr_batch.slurm.shell import splice

__all__ = ["render_template", "template_names", "template_placeholders", "template_text", "templates_dir"]


class _PlaceholderTemplate(string.Template):
    """``$name`` placeholders with lower-case names only.

    Upper-case shell variables (``$SLURM_JOB_ID``, ``${XVR_PYTHON:-}``) and ``$1``, ``$!``, ``$?``
    are left alone, so the templates stay readable shell. ``$$`` becomes ``$`` as in
    :class:`string.Template`; the templates do not use it.
    """

    idpattern = r"[a-z][a-z0-9_]*"
    flags = 0  # case-sensitive


def templates_dir() -> Path:
    """The folder of the sbatch templates (package data; the checkout's ``slurm/`` is a link to it)."""
    return Path(__file__).resolve().parent / "templates"


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
    """Fill the template ``slurm/<name>`` (``.sbatch`` may be left off) with ``values``; splice its blocks.

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
    return splice("".join(out))




def template_text(name: str) -> str:
    """Template ``name`` with its shared blocks spliced in and its placeholders left as they are."""
    return splice(_template_path(name).read_text())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m xvr_batch.slurm [NAME]``: print a template, complete but for its placeholders."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m xvr_batch.slurm NAME   (prints the template with its shared blocks; "
              f"templates: {', '.join(template_names())})", file=sys.stderr)
        return 2
    try:
        sys.stdout.write(template_text(args[0]))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

