"""Memory soak: a Loom service and its peers at a steady rate for minutes; RSS must stay flat.

Input is produced at ``--rate`` records/s for ``--minutes`` into one topic per
peer (the same records, in the same order, to every peer), and every peer
runs at the same time on the same broker: Loom (observability on, metrics
served) and, by default, the plain confluent-kafka loop from ``peers.py`` as
the reference footprint. Every ``--sample-s`` the harness records each
peer's resident memory (``/proc/<pid>/status``) and Loom's in-flight
tracking size (``loom_in_flight_records`` from ``/metrics``). After a
warm-up (the first ``--warmup-minutes``), every Loom sample must stay within
±10% of its post-warm-up median (DESIGN.md section 8); the peers' drift and
the ratio of medians Loom/peer are printed beside it.

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
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import PEER_LABELS, Cluster, PeerProcess, PeerSpec, Topics, free_port
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


@dataclass
class SoakedPeer:
    """One peer under soak: its process, its input topic and its samples."""

    name: str
    topics: Topics
    process: PeerProcess
    metrics_port: int | None = None
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    """(seconds since start, RSS MiB, in-flight records or NaN)."""

    def sample(self, elapsed: float) -> tuple[float, float, float]:
        self.process.check_alive()
        assert self.process.process is not None
        tracked = float("nan") if self.metrics_port is None else in_flight(self.metrics_port)
        sample = (elapsed, rss_mib(self.process.process.pid), tracked)
        self.samples.append(sample)
        return sample


def start_peers(
    names: list[str], cluster: Cluster, partitions: int, consumer: dict[str, object], logs: Path
) -> list[SoakedPeer]:
    peers = []
    for name in names:
        topics = cluster.fresh_topics(f"soak-{name}", partitions)
        port = free_port() if name == "loom" else None
        extra: dict[str, object] = {"consumer": consumer}
        if name == "loom":
            extra |= {"observability": "on", "prometheus_port": port}
        spec = PeerSpec(name, PEER_LABELS[name], extra=extra)
        [config] = spec.configs(cluster, topics, f"soak-{name}-{uuid.uuid4().hex[:6]}")
        peers.append(SoakedPeer(name, topics, PeerProcess(name, config, logs).start(), port))
    return peers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20_000.0, help="records/s into each peer")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--warmup-minutes", type=float, default=1.0)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument(
        "--peers", default="loom,plain", help="comma-separated; loom first (default loom,plain)"
    )
    parser.add_argument(
        "--consumer", type=json.loads, default={}, help="extra librdkafka consumer settings (JSON)"
    )
    args = parser.parse_args()
    names = [name.strip() for name in args.peers.split(",") if name.strip()]
    if names[:1] != ["loom"] or not set(names) <= set(PEER_LABELS):
        parser.error(f"--peers must start with loom and name peers among {', '.join(PEER_LABELS)}")
    with tempfile.TemporaryDirectory() as logs, DevBroker() as broker:
        cluster = Cluster(broker.bootstrap_servers, broker.pid)
        peers = start_peers(names, cluster, args.partitions, args.consumer, Path(logs))
        try:
            sent = soak(cluster, peers, args.rate, args.minutes * 60, args.sample_s)
        finally:
            for peer in peers:
                peer.process.stop()
    return report(peers, args.warmup_minutes * 60, sent / (args.minutes * 60))


def soak(
    cluster: Cluster, peers: list[SoakedPeer], rate: float, duration_s: float, sample_s: float
) -> int:
    """Produce at ``rate`` into every peer's input, sampling; returns records sent per peer."""
    producer = cluster.producer()
    began = time.monotonic()
    end = began + duration_s
    next_sample = began + sample_s
    sent = 0
    try:
        while (now := time.monotonic()) < end:
            due = int(rate * (now - began))
            while sent < due:
                value, key = order_bytes(sent), record_id(sent).encode()
                for peer in peers:
                    while True:
                        try:
                            producer.produce(peer.topics.input, value, key)
                            break
                        except BufferError:
                            producer.poll(0.01)
                sent += 1
            producer.poll(0)
            if now >= next_sample:
                line = "  ".join(_sample_text(peer, peer.sample(now - began)) for peer in peers)
                if cluster.broker_pid is not None:  # the in-memory broker grows with its data
                    line += f"  broker RSS {rss_mib(cluster.broker_pid):7.0f} MiB"
                print(f"{now - began:6.0f} s  {line}", flush=True)
                next_sample += sample_s
            time.sleep(0.005)  # pacing the producer, not waiting for data
    finally:
        producer.flush(10)
    return sent


def _sample_text(peer: SoakedPeer, sample: tuple[float, float, float]) -> str:
    text = f"{peer.name} RSS {sample[1]:6.1f} MiB"
    if peer.metrics_port is not None:
        text += f" in flight {sample[2]:6.0f}"
    return text


def report(peers: list[SoakedPeer], warmup_s: float, rate: float) -> int:
    loom = peers[0]
    medians: dict[str, float] = {}
    print(f"\nafter warm-up ({warmup_s:.0f} s), input {rate:,.0f} records/s into each peer")
    print(f"{'peer':<38}{'median':>10}{'min':>9}{'max':>9}{'drift':>17}  Loom/peer")
    for peer in peers:
        steady = [rss for t, rss, _ in peer.samples if t >= warmup_s]
        if not steady:
            print(f"{PEER_LABELS[peer.name]:<38} no samples after warm-up")
            return 1
        median = medians[peer.name] = statistics.median(steady)
        low, high = min(steady), max(steady)
        drift = f"{(low - median) / median:+.1%} / {(high - median) / median:+.1%}"
        ratio = medians["loom"] / median
        print(
            f"{PEER_LABELS[peer.name]:<38}{median:>6.1f} MiB{low:>9.1f}{high:>9.1f}"
            f"{drift:>17}  {ratio:8.2f}x"
        )
    steady_loom = [rss for t, rss, _ in loom.samples if t >= warmup_s]
    within = all(abs(rss - medians["loom"]) <= 0.1 * medians["loom"] for rss in steady_loom)
    print(f"\nLoom RSS within ±10% of its median after warm-up: {'PASS' if within else 'MISS'}")
    tracked = [flight for t, _, flight in loom.samples if t >= warmup_s]
    print(
        f"Loom in-flight tracking: median {statistics.median(tracked):,.0f} records, "
        f"max {max(tracked):,.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
