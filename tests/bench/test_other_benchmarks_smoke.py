"""The other benchmarks end to end with tiny sizes, so they cannot rot.

Start-up, soak and async throughput run as a person would run them (their own
broker, peers in subprocesses); shutdown and codec cost run in memory. The
numbers mean nothing at this size; what is checked is that each run
completes and prints its figures (Loom's next to the peers measured in it).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, timeout_s: float = 120) -> str:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    return completed.stdout


def test_the_startup_benchmark_times_loom_and_its_peers() -> None:
    out = run_bench("startup.py", "--runs", "1", "--peers", "loom,plain")
    assert "Loom ready (/readyz): median" in out
    plain = next(line for line in out.splitlines() if line.startswith("plain confluent-kafka"))
    assert plain.rstrip().endswith("x")  # its Loom/peer ratio


def test_the_soak_samples_loom_beside_the_plain_loop() -> None:
    tiny = ["--minutes", "0.25", "--rate", "500", "--sample-s", "1", "--warmup-minutes", "0.05"]
    out = run_bench("soak.py", *tiny, "--heap")
    rss, heap = out.split("resident memory (RSS)")[1].split("live heap (memray")
    for table in (rss, heap):
        assert "Loom StreamFlow (at-least-once)" in table
        assert "plain confluent-kafka loop" in table
        assert "Loom/peer" in table
    assert "Loom in-flight tracking: median" in out
    assert "plain's broker: " in out


def test_the_async_benchmark_runs_loom_and_a_bare_event_loop_peer() -> None:
    out = run_bench("async_throughput.py", "--records", "500", "--repeat", "1")
    rows = [line.split() for line in out.splitlines() if line.startswith("memory")]
    assert {(row[1], row[2]) for row in rows} == {
        (backend, who) for backend in ("asyncio", "uvloop", "trio") for who in ("loom", "peer")
    }


def test_the_shutdown_benchmark_times_a_stop_with_a_stuck_async_call() -> None:
    out = run_bench("shutdown.py", "--runs", "1", "--timeouts-ms", "100")
    [row] = [line.split() for line in out.splitlines() if line.lstrip().startswith("100 ms")]
    assert row[-1].endswith("s")  # the overshoot


def test_the_codec_benchmark_prices_every_codec_against_its_library() -> None:
    out = run_bench("codec_decode.py", "--records", "1000", "--repeat", "1")
    assert [line.split(",")[0] for line in out.splitlines()[1:]] == [
        "msgspec",
        "msgspec",
        "pydantic",
    ]
