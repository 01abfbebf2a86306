"""The benchmark harness end to end with tiny N, so ``bench/`` cannot rot.

Runs ``bench/run.py`` exactly as a person would (its own broker, every peer
in its own subprocess, scaling and latency included) with a few thousand
records. The rates it prints mean nothing at this size; what is checked is
that every peer processed and committed everything and the report is whole.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECORDS = 2000

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("quixstreams") is None,
    reason=(
        "quixstreams is not installed, so the benchmark's Quix Streams peer cannot run: "
        ".venv/bin/pip install --no-deps -r bench/requirements.txt"
    ),
)


def test_the_benchmark_runs_every_peer_end_to_end(tmp_path: Path) -> None:
    report_path = tmp_path / "bench.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--records",
            str(RECORDS),
            "--runs",
            "1",
            "--partitions",
            "2",
            "--scaling",
            "1x1,1x2,2x1",
            "--scaling-partitions",
            "2",
            "--latency-seconds",
            "1",
            "--latency-rate",
            "2000",
            "--quiet-wait",
            "0",
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    report = json.loads(report_path.read_text())

    for peer in ("loom", "bytewax", "quix", "plain"):
        (run,) = report["throughput"][peer]["runs"]
        assert run["error"] is None, run["error"]
        assert run["output_records"] >= RECORDS
        assert run["rate"] > 0
    for peer in ("loom", "quix", "plain"):  # the peers that commit
        assert report["throughput"][peer]["runs"][0]["committed"] == RECORDS

    assert [row["workers"] for row in report["scaling"]] == [1, 2, 2]
    assert all(row["median"] for row in report["scaling"])

    assert len(report["latency"]) == 2  # Loom's defaults, then a short fetch wait
    for latency in report["latency"]:
        assert latency["error"] is None, latency["error"]
        assert 0 <= latency["p50_ms"] <= latency["p99_ms"]

    assert "Loom/peer" in completed.stdout
    for target in ("0.8x", "1.5x", "2.5x"):
        assert f"Loom >= {target}" in completed.stdout
