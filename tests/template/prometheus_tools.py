"""Prometheus' own tools for the template tests: promtool and the server.

Both come from the Debian package ``prometheus`` (``.ci/run`` installs it).
Without it a test skips, saying so, except under CI (``CI=true``), where the
missing package is a failure: CI must run these tests.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def prometheus_binary(name: str) -> Path:
    """``promtool`` or ``prometheus``; skips (outside CI) when it is not installed."""
    found = shutil.which(name)
    if found is not None:
        return Path(found)
    reason = f"{name} is not installed (apt-get install prometheus)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}: under CI it must be; .ci/run installs it")
    pytest.skip(reason)


def github_anchor(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    kept = "".join(c for c in heading.strip().lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")
