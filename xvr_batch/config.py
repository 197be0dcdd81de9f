"""``--config FILE`` (TOML) for every command.

Keys mirror the command's long flags (``unit-frames`` or ``unit_frames`` for ``--unit-frames``). Values from
the file become the command's defaults, so flags given on the command line always win. A table named
after the command (``[reconstruct]``, ``[train]``, ...) applies to that command only; top-level keys apply
to every command that has such an option. Unknown keys are an error, not silently ignored.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from xvr_batch.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["ConfigCommand", "load_config"]


def load_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: config file not found; check --config")
    try:
        with open(p, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"{p}: not valid TOML ({exc}); fix the file") from None
    except OSError as exc:
        raise UserError(f"{p}: cannot read the config file ({exc.strerror})") from None


def _find_config_arg(args: list[str]) -> str | None:
    for i, a in enumerate(args):
        if a == "--":
            return None
        if a == "--config" and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


class ConfigCommand(click.Command):
    """A click command whose defaults come from ``--config FILE`` when given."""

    def make_context(self, info_name, args, parent=None, **extra):
        path = _find_config_arg(list(args))
        if path:
            data = load_config(path)
            section = data.get(self.name, {}) if isinstance(data.get(self.name), dict) else {}
            params = {p.name: p for p in self.params if isinstance(p, click.Option)}
            known = ", ".join(sorted(n.replace("_", "-") for n in params))
            defaults: dict[str, Any] = {}
            top = {k: v for k, v in data.items() if not isinstance(v, dict)}
            for scope, items in (("top", top), ("section", section)):
                for key, value in items.items():
                    name = key.replace("-", "_")
                    if name == "config":
                        continue
                    if name in params:
                        defaults[name] = value
                    elif scope == "section":  # top-level keys may belong to other commands
                        raise UserError(f"{path}: unknown key {key!r} in [{self.name}]; known keys: {known}")
            if not defaults and (top or section):
                raise UserError(f"{path}: no key applies to `{self.name}`; known keys: {known}")
            extra["default_map"] = {**(extra.get("default_map") or {}), **defaults}
        return super().make_context(info_name, args, parent=parent, **extra)
