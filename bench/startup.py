"""Start-up time: Loom's service to ready, and every peer's process start to first output.

    .venv/bin/python bench/startup.py --runs 5 [--peers loom,bytewax,quix,plain]

One dev broker (``loom.devtools.broker.DevBroker``, Tansu), two measurements,
interleaved run by run (run 1 of everything, then run 2, ...):

1. **Loom ready**, the target's definition. A service the way a generated one
   runs (``python -m tests.kafka.service_app``, the template's service shape,
   configured by ``LOOM_*`` variables only), timed from ``exec`` until
   ``/readyz`` answers 200, which happens when every worker has built its
   source and assigned its partitions, right before its first poll. Median of
   ``--runs``; target (docs/benchmarks.md, Targets): under 2 s, printed as PASS/MISS.
2. **Start-up against the peers**, one measure for all of them, Loom included:
   the peers of ``bench/run.py`` (``bench/peers.py``: ``loom``, ``bytewax``,
   ``quix``, ``plain``), each run in a fresh subprocess with one input record
   already waiting in a fresh 3-partition input topic, timed from process
   start until the harness reads the first output record (imports, client
   set-up, consumer-group join, first fetch, processing, produce). It is the
   *start-up* column of ``bench/run.py``, read with a finer clock (the harness
   polls for output every 10 ms with 5 ms fetch waits). Median of ``--runs``
   per peer. Quix Streams is skipped, with a note, when ``quixstreams`` is not
   installed (``.venv/bin/pip install --no-deps -r bench/requirements.txt``).

Output: one line per run and measurement while it runs, then::

    Loom ready (/readyz): median 0.45 s (min 0.41, max 0.52)  PASS
    target: import + compile + build + first poll under 2 s

    start-up: process start to first output record, 1 record waiting (median of 5)
    peer                                   median  runs                           Loom/peer speed
    ---------------------------------------------------------------------------------------------
    Loom StreamFlow (at-least-once)        0.62 s  0.66 0.62 0.60 ...                       1.00x
    Bytewax KafkaSource->map->KafkaSink    ...
    Quix Streams (at-least-once)           ...
    plain confluent-kafka loop             ...
    Loom/peer speed = the peer's median time / Loom's median time: above 1.00x Loom starts
    faster (2.00x = in half the peer's time), below 1.00x slower.

The ratio follows ``bench/run.py``'s convention: a Loom/peer ratio above 1
favours Loom. The exit code is 1 if any peer run failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    PEER_LABELS,
    STARTUP_TIMEOUT_S,
    BenchError,
    Cluster,
    OutputWatch,
    PeerProcess,
    PeerSpec,
    log_directory,
)

from loom.devtools.broker import DevBroker, free_port

ROOT = Path(__file__).resolve().parents[1]
PARTITIONS = 3
"""Partitions of every topic, as in ``bench/run.py``'s default."""
RECORDS = 1
"""Input records waiting before a peer starts; the clock stops at the first output."""
POLL_S = 0.01
"""How long one read of the output topic may block: the resolution of the peers' clock."""
QUIX_MISSING = (
    "Quix Streams skipped: quixstreams is not installed "
    "(.venv/bin/pip install --no-deps -r bench/requirements.txt)"
)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def one_start(broker: DevBroker, topics: dict[str, str]) -> float:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOOM_", "OTEL_"))}
    env |= {
        "PYTHONPATH": str(ROOT),
        "LOOM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "LOOM_KAFKA__GROUP_ID": "startup",
        "LOOM_KAFKA__CONSUMER": '{"enable.auto.commit": false}',
        "LOOM_OBSERVABILITY__PROMETHEUS_PORT": str(port),
        "LOOM_LOG_LEVEL": "WARNING",
        **{f"LOOM_TOPICS__{name.upper()}": topic for name, topic in topics.items()},
    }
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "tests.kafka.service_app"], env=env, cwd=ROOT)
    try:
        deadline = started + 30
        while not ready(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the service did not become ready")
            time.sleep(0.005)  # polling interval of the measurement
        return time.monotonic() - started
    finally:
        process.terminate()
        process.wait(30)


def first_output(cluster: Cluster, peer: str, log_dir: Path) -> float:
    """Seconds from the peer's process start to the harness reading its first output record.

    Composed from the harness's pieces like ``harness.measure``, but stops at
    the first output record (no commit wait, no CPU accounting) and reads the
    output with short fetch waits (``keep_ids=True``) polled every ``POLL_S``.
    Raises :class:`harness.BenchError` if the peer dies or takes longer than
    ``harness.STARTUP_TIMEOUT_S``.
    """
    spec = PeerSpec(peer, PEER_LABELS[peer])
    topics = cluster.fresh_topics(f"{peer}-start", PARTITIONS)
    group = f"startup-{peer}-{uuid.uuid4().hex[:8]}"
    cluster.produce_inputs(topics.input, RECORDS)
    # keep_ids=True is what gives the watch 5 ms fetch waits (Tansu holds every
    # fetch for the full fetch.wait.max.ms); the ids it keeps are not used.
    watch = OutputWatch(cluster, topics, keep_ids=True)
    processes = [
        PeerProcess(peer, config, log_dir) for config in spec.configs(cluster, topics, group)
    ]
    try:
        for process in processes:
            process.start()
        started = processes[0].started
        deadline = started + STARTUP_TIMEOUT_S
        while not watch.poll(POLL_S):
            for process in processes:
                process.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{spec.label}: no output record {STARTUP_TIMEOUT_S:g} s after start\n"
                    f"{processes[0].log_tail()}"
                )
        assert watch.first_seen is not None
        return watch.first_seen - started
    finally:
        for process in processes:
            process.stop()
        watch.close()
        cluster.delete_topics(topics)


def _fmt_s(value: float | None) -> str:
    return "FAILED" if value is None else f"{value:.2f}"


def print_peers(runs: int, peers: list[str], times: dict[str, list[float | None]]) -> None:
    def median(peer: str) -> float | None:
        ok = [t for t in times.get(peer, []) if t is not None]
        return statistics.median(ok) if ok else None

    loom = median("loom")
    print()
    print(
        f"start-up: process start to first output record, {RECORDS} record waiting "
        f"(median of {runs})"
    )
    header = f"{'peer':<38} {'median':>7}  {'runs':<30} {'Loom/peer speed':>15}"
    print(header)
    print("-" * len(header))
    for peer in PEER_LABELS:
        label = PEER_LABELS[peer]
        if peer not in peers:
            if peer == "quix" and peer in times:
                print(f"{label:<38} skipped: quixstreams is not installed")
            continue
        value = median(peer)
        shown = f"{value:.2f} s" if value is not None else "FAILED"
        listed = " ".join(_fmt_s(t) for t in times[peer])
        ratio = f"{value / loom:.2f}x" if loom and value else "-"
        print(f"{label:<38} {shown:>7}  {listed:<30} {ratio:>15}")
    print("Loom/peer speed = the peer's median time / Loom's median time: above 1.00x Loom starts")
    print("faster (2.00x = in half the peer's time), below 1.00x slower.")
    if loom is None:
        print("(no Loom median to compare with: add loom to --peers)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per measurement (median)")
    parser.add_argument(
        "--peers",
        default=",".join(PEER_LABELS),
        help=f"comma-separated subset of {','.join(PEER_LABELS)} (Loom's /readyz always runs)",
    )
    args = parser.parse_args(argv)
    args.peers = list(dict.fromkeys(p.strip() for p in args.peers.split(",") if p.strip()))
    unknown = sorted(set(args.peers) - set(PEER_LABELS))
    if unknown:
        parser.error(f"unknown peers: {', '.join(unknown)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requested = list(args.peers)
    peers = list(requested)
    if "quix" in peers and importlib.util.find_spec("quixstreams") is None:
        print(QUIX_MISSING)
        peers.remove("quix")
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load average before the benchmark: {load} (anything else running skews the numbers)")
    ready_times: list[float] = []
    times: dict[str, list[float | None]] = {peer: [] for peer in requested}
    with log_directory(None) as log_dir, DevBroker() as broker:
        cluster = Cluster(broker.bootstrap_servers, broker.pid)
        topics = {name: f"startup-{name}" for name in ("input", "output", "dlq")}
        broker.create_topics(dict.fromkeys(topics.values(), PARTITIONS))
        for run in range(args.runs):
            elapsed = one_start(broker, topics)
            ready_times.append(elapsed)
            print(f"run {run + 1}: Loom ready after {elapsed:.2f} s", flush=True)
            for peer in peers:
                try:
                    seconds: float | None = first_output(cluster, peer, log_dir)
                    shown = f"first output after {seconds:.2f} s"
                except BenchError as exc:
                    seconds, shown = None, f"FAILED: {exc}"
                times[peer].append(seconds)
                print(f"run {run + 1}: {PEER_LABELS[peer]:<38} {shown}", flush=True)
    median = statistics.median(ready_times)
    verdict = "PASS" if median < 2.0 else "MISS"
    print(
        f"\nLoom ready (/readyz): median {median:.2f} s "
        f"(min {min(ready_times):.2f}, max {max(ready_times):.2f})  {verdict}"
    )
    print("target: import + compile + build + first poll under 2 s")
    print_peers(args.runs, peers, times)
    failed = any(t is None for peer in peers for t in times[peer])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
