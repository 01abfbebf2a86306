"""The repository stands alone: no tracked file cites a document outside it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Spelt in pieces so that this file does not cite them itself.
OUTSIDE = [("DESIGN" + ".md").encode(), ("../" + "shared").encode()]


def tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


def test_no_tracked_file_cites_a_document_outside_the_repository() -> None:
    files = tracked_files()
    citing = [
        f"{path.relative_to(ROOT)}: {needle.decode()}"
        for path in files
        if path.is_file()
        for needle in OUTSIDE
        if needle in path.read_bytes()
    ]
    assert len(files) > 100  # the listing worked
    assert citing == []
