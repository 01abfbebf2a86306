"""Base classes for Loom's immutable value objects."""

from __future__ import annotations

import msgspec


class LoomFrozenStruct(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Immutable, hashable settings object.

    Built on ``msgspec.Struct`` so that a mapping (from YAML, a dict or the
    environment) converts into it with type validation in one call
    (``msgspec.convert``), and unknown keys are rejected instead of silently
    ignored: a misspelt setting is an error, not a default.
    """
