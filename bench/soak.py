"""Memory soak: a Loom service at a steady rate for minutes; RSS must stay flat.

Input is produced at ``--rate`` records/s for ``--minutes``; every
``--sample-s`` the harness records the service's resident memory
(``/proc/<pid>/status``) and its in-flight tracking size
(``loom_in_flight_records`` from ``/metrics``). After a warm-up (the first
``--warmup-minutes``), every sample must stay within ±10% of the post-warm-up
median (DESIGN.md section 8).

    .venv/bin/python bench/soak.py --minutes 10 --rate 20000
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Cluster, PeerProcess, PeerSpec, free_port
from work import order_bytes, record_id

from loom.devtools.broker import DevBroker


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) / 1024 if match else 0.0


def in_flight(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return float("nan")
    values = re.findall(r"^loom_in_flight_records\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(value) for value in values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20_000.0)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--warmup-minutes", type=float, default=1.0)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument(
        "--consumer", type=json.loads, default={}, help="extra librdkafka consumer settings (JSON)"
    )
    args = parser.parse_args()
    port = free_port()
    samples: list[tuple[float, float, float]] = []
    with tempfile.TemporaryDirectory() as logs, DevBroker() as broker:
        cluster = Cluster(broker.bootstrap_servers, broker.pid)
        topics = cluster.fresh_topics("soak", args.partitions)
        extra = {"observability": "on", "prometheus_port": port, "consumer": args.consumer}
        spec = PeerSpec("loom", "Loom soak", extra=extra)
        [config] = spec.configs(cluster, topics, f"soak-{uuid.uuid4().hex[:6]}")
        peer = PeerProcess("loom", config, Path(logs)).start()
        producer = cluster.producer()
        assert peer.process is not None
        began = time.monotonic()
        end = began + args.minutes * 60
        next_sample = began + args.sample_s
        sent = 0
        try:
            while (now := time.monotonic()) < end:
                due = int(args.rate * (now - began))
                while sent < due:
                    try:
                        producer.produce(topics.input, order_bytes(sent), record_id(sent).encode())
                        sent += 1
                    except BufferError:
                        producer.poll(0.01)
                producer.poll(0)
                if now >= next_sample:
                    peer.check_alive()
                    sample = (now - began, rss_mib(peer.process.pid), in_flight(port))
                    samples.append(sample)
                    print(
                        f"{sample[0]:6.0f} s  RSS {sample[1]:7.1f} MiB  in flight {sample[2]:8.0f}"
                    )
                    next_sample += args.sample_s
                time.sleep(0.005)  # pacing the producer, not waiting for data
        finally:
            producer.flush(10)
            peer.stop()
    return report(samples, args.warmup_minutes * 60, sent / (args.minutes * 60))


def report(samples: list[tuple[float, float, float]], warmup_s: float, rate: float) -> int:
    steady = [rss for t, rss, _ in samples if t >= warmup_s]
    if not steady:
        print("no samples after warm-up")
        return 1
    median = statistics.median(steady)
    low, high = min(steady), max(steady)
    within = all(abs(rss - median) <= 0.1 * median for rss in steady)
    tracked = [flight for t, _, flight in samples if t >= warmup_s]
    print(
        f"\nafter warm-up: RSS median {median:.1f} MiB, range {low:.1f}..{high:.1f} MiB "
        f"({(low - median) / median:+.1%} / {(high - median) / median:+.1%})  "
        f"{'PASS' if within else 'MISS'} (target ±10%)"
    )
    median_tracked = statistics.median(tracked)
    print(f"in-flight tracking: median {median_tracked:,.0f} records, max {max(tracked):,.0f}")
    print(f"input rate {rate:,.0f} records/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
