"""``--config FILE`` (TOML) for every command.

Keys mirror the command's long flags: ``unit-frames`` (or ``unit_frames``) for ``--unit-frames``, ``time`` for
``--time``, ``output`` for ``-o/--output``. Values from the file become the command's defaults, so flags given
on the command line always win. A table named after a command (``[reconstruct]``, ``[train]``, ...) applies to
that command only; top-level keys apply to every command that has such a flag.

Everything in the file is checked, and every problem is one :class:`UserError` naming the file and the key:

* a key in a command's table must be a flag of that command; a top-level key must be a flag of at least one
  command; a top-level table must be named after a command;
* a value must have the flag's type: an integer flag takes a TOML integer (not a float or a boolean), a
  number flag an integer or a finite float, a switch ``true``/``false``, a choice one of its strings, a
  text flag a string; a repeatable flag takes a list of such values, a flag of N values a list of N;
* the file must be UTF-8 TOML of at most :data:`MAX_CONFIG_BYTES`.
"""

from __future__ import annotations

import math
import reprlib
import sys
from pathlib import Path
from typing import Any, Mapping

import click

from xvr_batch.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigCommand", "load_config", "MAX_CONFIG_BYTES"]

#: A config file holds a few dozen keys; anything larger is not one.
MAX_CONFIG_BYTES = 1 << 20
#: Flags that make no sense in a file.
_NOT_IN_FILE = ("config", "debug", "help")

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 60
_short.maxlist = _short.maxdict = 6
_short.maxlevel = 2


def load_config(path: str | Path) -> dict[str, Any]:
    """The parsed TOML file; a missing, unreadable, oversized, non-UTF-8 or invalid file is a UserError."""
    p = Path(path)
    try:
        if not p.is_file():
            raise UserError(f"{p}: config file not found (or not a regular file); check --config")
        size = p.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise UserError(f"{p}: config file is {size} bytes, more than {MAX_CONFIG_BYTES}; check --config")
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UserError(f"{p}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: config file is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p}: not valid TOML ({exc}); fix the file") from None
    except RecursionError:
        raise UserError(f"{p}: not valid TOML (values nested too deeply); fix the file") from None


def _toml_repr(value: Any) -> str:
    """A short rendering of a parsed TOML value, with TOML's ``true``/``false``."""
    return "true" if value is True else "false" if value is False else _short.repr(value)


def _find_config_arg(args: list[str]) -> str | None:
    """The value of the last ``--config`` before ``--`` (click, too, keeps the last of a repeated option)."""
    found = None
    for i, a in enumerate(args):
        if a == "--":
            break
        if a == "--config" and i + 1 < len(args):
            found = args[i + 1]
        elif a.startswith("--config="):
            found = a.split("=", 1)[1]
    return found


def _norm(key: str) -> str:
    return key.replace("_", "-")


def flag_keys(command: click.Command) -> dict[str, click.Option]:
    """``{key: option}`` for the options of ``command`` a config file may set: one key per long flag name,
    spelled with ``-`` (``--time`` -> ``time``, ``--unit-frames`` -> ``unit-frames``)."""
    keys: dict[str, click.Option] = {}
    for p in command.params:
        if not isinstance(p, click.Option) or p.name in _NOT_IN_FILE:
            continue
        for opt in p.opts:
            if opt.startswith("--"):
                keys[_norm(opt[2:])] = p
    return keys


def _expected(p: click.Option) -> str:
    t = p.type
    if p.is_flag:
        one = "true or false"
    elif isinstance(t, click.Choice):
        one = "one of " + ", ".join(repr(str(c)) for c in t.choices)
    elif isinstance(t, click.types.IntParamType):
        one = "an integer"
    elif isinstance(t, click.types.FloatParamType):
        one = "a finite number"
    else:
        one = "a string"
    if p.multiple:
        return f"a list whose items are each {one}"
    if p.nargs > 1:
        return f"a list of {p.nargs} items, each {one}"
    return one


def _scalar_ok(p: click.Option, v: Any) -> bool:
    t = p.type
    if p.is_flag:
        return isinstance(v, bool)
    if isinstance(t, click.types.IntParamType):
        return isinstance(v, int) and not isinstance(v, bool)
    if isinstance(t, click.types.FloatParamType):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return isinstance(v, str)


def _check_value(path: str, where: str, key: str, p: click.Option, value: Any) -> Any:
    """``value`` as the default of option ``p``, or a UserError naming the file, the key and the type."""
    def refuse(problem: str = "") -> UserError:
        return UserError(f"{path}: key {key!r}{where} = {_toml_repr(value)}: {problem or 'expected ' + _expected(p)} "
                         f"(--{_norm(key)}); fix the config file")

    if p.multiple or p.nargs > 1:
        if not isinstance(value, list) or (p.nargs > 1 and not p.multiple and len(value) != p.nargs):
            raise refuse()
        items = value
        if p.multiple and p.nargs > 1:
            if not all(isinstance(i, list) and len(i) == p.nargs for i in value):
                raise refuse()
            items = [x for i in value for x in i]
    else:
        items = [value]
    for item in items:
        if not _scalar_ok(p, item):
            raise refuse()
        # ranges and choices: let the option's own type check the item (no files are opened for these types)
        if not p.is_flag and isinstance(p.type, (click.Choice, click.types.IntParamType,
                                                 click.types.FloatParamType)):
            try:
                p.type.convert(item, p, None)
            except click.BadParameter as exc:
                raise refuse(" ".join(str(exc.message).split()).rstrip(".")) from None
    return value


def _commands(self: click.Command, parent: click.Context | None) -> dict[str, click.Command]:
    """Every command of the CLI (so that a top-level key of another command is accepted)."""
    if parent is not None and isinstance(parent.command, click.Group):
        group: click.Group = parent.command
    else:
        from xvr_batch.cli import main_group  # here, not at the top: cli imports this module
        group = main_group
    commands = {name: cmd for name, cmd in group.commands.items() if isinstance(cmd, click.Command)}
    commands.setdefault(self.name or "", self)
    return commands


def config_defaults(path: str, data: Mapping[str, Any], command: click.Command,
                    commands: Mapping[str, click.Command]) -> dict[str, Any]:
    """Check the whole file ``data`` and return ``{parameter name: value}`` for ``command``.

    Top-level keys apply to ``command`` when it has the flag, and must be a flag of some command; the table
    named after ``command`` applies on top of them; other commands' tables are checked against their own
    flags. Raises :class:`UserError` on the first problem."""
    keys = {name: flag_keys(cmd) for name, cmd in commands.items()}
    mine = keys[command.name or ""]

    def known(name: str) -> str:
        return ", ".join(sorted(keys[name]))

    def once(seen: dict[str, str], key: str, where: str) -> str:
        k = _norm(key)
        if k in seen:
            raise UserError(f"{path}: keys {seen[k]!r} and {key!r}{where} name the same flag --{k}; keep one")
        seen[k] = key
        return k

    top: dict[str, tuple[str, Any]] = {}
    seen_top: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            owners = [flags[_norm(key)] for flags in keys.values() if _norm(key) in flags]
            if key not in commands and owners:  # an inline table as a flag's value: a type error
                _check_value(path, "", key, mine.get(_norm(key), owners[0]), value)
            if key not in commands:
                raise UserError(f"{path}: unknown table [{key}]; a table must be named after a command "
                                f"({', '.join(sorted(commands))}); fix the config file")
            continue
        k = once(seen_top, key, "")
        if k in _NOT_IN_FILE:
            raise UserError(f"{path}: key {key!r} cannot be set in a config file; give it on the command line")
        if k not in mine:
            if not any(k in flags for flags in keys.values()):
                raise UserError(f"{path}: unknown key {key!r}: it is no flag of any command; "
                                f"`{command.name}` knows: {known(command.name or '')}")
            continue  # another command's flag
        top[k] = (key, value)

    defaults: dict[str, Any] = {}
    for k, (key, value) in top.items():
        p = mine[k]
        defaults[p.name] = _check_value(path, "", key, p, value)
    section_keys = 0
    for name, section in data.items():
        if not isinstance(section, dict):
            continue
        seen: dict[str, str] = {}
        for key, value in section.items():
            k = once(seen, key, f" in [{name}]")
            if k in _NOT_IN_FILE:
                raise UserError(f"{path}: key {key!r} in [{name}] cannot be set in a config file; "
                                "give it on the command line")
            if k not in keys[name]:
                raise UserError(f"{path}: unknown key {key!r} in [{name}]; known keys: {known(name)}")
            p = keys[name][k]
            checked = _check_value(path, f" in [{name}]", key, p, value)
            if name == command.name:
                defaults[p.name] = checked
                section_keys += 1
    if data and not top and not section_keys:
        raise UserError(f"{path}: no key applies to `{command.name}`; known keys: {known(command.name or '')}")
    return defaults


class ConfigCommand(click.Command):
    """A click command whose defaults come from ``--config FILE`` when given (flags on the command line win)."""

    def make_context(self, info_name, args, parent=None, **extra):
        path = _find_config_arg(list(args))
        if path:
            data = load_config(path)
            defaults = config_defaults(path, data, self, _commands(self, parent))
            extra["default_map"] = {**(extra.get("default_map") or {}), **defaults}
        return super().make_context(info_name, args, parent=parent, **extra)
