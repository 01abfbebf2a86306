"""``${VAR}`` and ``${VAR:-default}`` substitution in loaded YAML.

Substitution runs on string scalars *after* parsing, so a variable's value can
never change the document's structure (no YAML injection through the
environment).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class MissingVariableError(KeyError):
    """A ``${VAR}`` without default names an unset environment variable."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return (
            f"environment variable {self.name} is referenced by the config file "
            "but not set (use ${" + self.name + ":-default} for an optional one)"
        )


def interpolate(value: Any, environ: Mapping[str, str]) -> Any:
    """Return ``value`` with every ``${...}`` in its strings substituted."""
    if isinstance(value, str):
        return _PATTERN.sub(lambda match: _lookup(match, environ), value)
    if isinstance(value, Mapping):
        return {key: interpolate(item, environ) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, environ) for item in value]
    return value


def _lookup(match: re.Match[str], environ: Mapping[str, str]) -> str:
    name, default = match.group(1), match.group(2)
    if name in environ and (environ[name] or default is None):
        return environ[name]
    if default is not None:
        return default
    raise MissingVariableError(name)
