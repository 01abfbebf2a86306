"""``${VAR}`` and ``${VAR:-default}`` substitution in loaded YAML.

Substitution runs on string scalars *after* parsing, so a variable's value can
never change the document's structure (no YAML injection through the
environment).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from loom.errors import MissingVariableError as MissingVariableError  # noqa: PLC0414 (re-export)

_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


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
