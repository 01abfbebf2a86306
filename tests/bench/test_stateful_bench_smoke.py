"""The stateful benchmark end to end with tiny sizes, so ``bench/windows.py`` cannot rot.

Runs ``bench/windows.py`` as a person would (its own broker, every peer in its
own subprocess) with a few thousand records: the window part with Loom,
Bytewax and (when installed) Quix Streams, the dedup part, and the memory
part with tiny key counts. The rates mean nothing at this size; what is
checked is that every peer's window results equal the harness's own count and
sum per (key, window), that dedup let exactly the unique ids through, and
that the report is whole.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HAS_QUIX = importlib.util.find_spec("quixstreams") is not None


def test_every_stateful_peer_produces_the_same_correct_results(tmp_path: Path) -> None:
    peers = ["loom", "bytewax"] + (["quix"] if HAS_QUIX else [])
    report_path = tmp_path / "stateful.json"
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "windows.py"),
            "--records",
            "3000",
            "--keys",
            "100",
            "--span-s",
            "10",
            "--runs",
            "1",
            "--partitions",
            "2",
            "--peers",
            ",".join(peers),
            "--dedup-records",
            "2000",
            "--memory-keys",
            "2000",
            "--memory-warmup",
            "200",
            "--memory-peers",
            "loom-dedup,loom-window",
            "--quiet-wait",
            "0",
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    report = json.loads(report_path.read_text())

    windows = report["windows"]
    assert windows["results"] > 100  # (key, window) pairs the harness expects
    assert set(windows["peers"]) == set(peers)
    for peer, found in windows["peers"].items():
        (run,) = found["runs"]
        assert run["error"] is None, (peer, run["error"])
        assert run["verified"], peer  # equal to the harness's count and sum, window by window
        assert run["outputs"] >= windows["results"]
        assert run["rate"] > 0

    for flow in ("loom-passthrough", "loom-dedup"):
        (run,) = report["dedup"][flow]["runs"]
        assert run["error"] is None, (flow, run["error"])
        assert run["verified"], flow
    assert report["dedup"]["loom-dedup"]["runs"][0]["expected_outputs"] < 2000

    assert [row["peer"] for row in report["memory"]] == ["loom-dedup", "loom-window"]
    for row in report["memory"]:
        assert row["error"] is None, row["error"]
        assert row["rss_after_mib"] > 0

    out = completed.stdout
    assert "Loom/peer" in out
    assert "Loom >= 2x Bytewax" in out
    if HAS_QUIX:
        assert "Loom >= 4x Quix Streams" in out
    assert "Loom StatefulStep dedup >= 0.7x the stateless flow" in out
    assert "bytes/key" in out
