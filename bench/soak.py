"""Memory soak: a Loom service and its peers at a steady rate for minutes; RSS must stay flat.

Input is produced at ``--rate`` records/s for ``--minutes`` into every peer
(the same records, in the same order), and every peer runs at the same time:
Loom (observability on, metrics served) and, by default, the plain
confluent-kafka loop from ``peers.py`` as the reference footprint. Each peer
has a broker of its own, so one peer's data and bursts cannot slow the
other's broker (the in-memory dev broker keeps every record it is given).

Every ``--sample-s`` the harness records, per peer: its resident memory
(``/proc/<pid>/status``), Loom's in-flight tracking size
(``loom_in_flight_records`` from ``/metrics``), its broker's RSS, and the
slowest delivery of the harness's own input records in that interval. That
last figure tells a steady input from a broker stall: when the broker stops
answering for seconds, the input reaches the peer as one burst afterwards,
and any client's memory follows the burst.

With ``--heap``, every Python peer also runs under memray's tracker
(``bench/requirements.txt``), and the report adds each peer's live heap (bytes
allocated and not yet freed, Python and native) beside its RSS: the heap is
what the process holds, the difference is what the allocator keeps.

After a warm-up (the first ``--warmup-minutes``), every Loom RSS sample must
stay within ±10% of its post-warm-up median (docs/benchmarks.md, Targets); the peers'
drift and the ratio of medians Loom/peer are printed beside it.

    .venv/bin/python bench/soak.py --minutes 10 --rate 2000 [--heap]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import PEER_LABELS, Cluster, PeerProcess, PeerSpec, Topics, free_port
from work import order_bytes, record_id

from loom.devtools.broker import DevBroker

STALL_S = 1.0
"""An input record that takes longer than this to be acknowledged marks a broker stall."""


def resident_mib(pid: int) -> tuple[float, float]:
    """Resident memory of ``pid`` in MiB: all of it (VmRSS) and its anonymous part (RssAnon)."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = dict(re.findall(r"^(VmRSS|RssAnon):\s+(\d+) kB", status, re.M))
    return int(found.get("VmRSS", 0)) / 1024, int(found.get("RssAnon", 0)) / 1024


def in_flight(port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return float("nan")
    values = re.findall(r"^loom_in_flight_records\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(value) for value in values)


class Sample(NamedTuple):
    elapsed_s: float
    rss_mib: float
    anon_mib: float
    """The anonymous part of the RSS (heap, stacks); the rest is mapped files, such as code."""
    in_flight: float
    """Loom's tracked records, NaN for peers without metrics."""
    broker_rss_mib: float
    slowest_input_s: float
    """The slowest acknowledgement of an input record since the previous sample."""


class InputClock:
    """The slowest broker acknowledgement of the input records since the last look."""

    def __init__(self) -> None:
        self.slowest_s = 0.0

    def delivered(self, error: object, message: Any) -> None:
        _kind, created_ms = message.timestamp()
        self.slowest_s = max(self.slowest_s, time.time() - created_ms / 1000)

    def take(self) -> float:
        slowest, self.slowest_s = self.slowest_s, 0.0
        return slowest


@dataclass
class SoakedPeer:
    """One peer under soak, with its own broker, input producer and samples."""

    name: str
    broker: DevBroker
    topics: Topics
    process: PeerProcess
    metrics_port: int | None
    heap_capture: Path | None
    producer: Any
    """The harness's producer of this peer's input."""
    clock: InputClock = field(default_factory=InputClock)
    samples: list[Sample] = field(default_factory=list)

    def sample(self, elapsed: float) -> Sample:
        self.process.check_alive()
        assert self.process.process is not None
        assert self.broker.pid is not None
        tracked = float("nan") if self.metrics_port is None else in_flight(self.metrics_port)
        rss, anon = resident_mib(self.process.process.pid)
        broker_rss, _ = resident_mib(self.broker.pid)
        sample = Sample(elapsed, rss, anon, tracked, broker_rss, self.clock.take())
        self.samples.append(sample)
        return sample

    def stalls(self, after_s: float) -> list[float]:
        return [
            s.slowest_input_s
            for s in self.samples
            if s.elapsed_s >= after_s and s.slowest_input_s > STALL_S
        ]


@contextlib.contextmanager
def soaked_peers(
    names: list[str],
    logs: Path,
    *,
    partitions: int,
    consumer: dict[str, object],
    heap: bool,
    peer_env: dict[str, str],
) -> Iterator[list[SoakedPeer]]:
    """Start a broker and a peer for each name; stop them all on the way out."""
    with contextlib.ExitStack() as stack:
        peers = []
        for name in names:
            broker = stack.enter_context(DevBroker())
            cluster = Cluster(broker.bootstrap_servers, broker.pid)
            topics = cluster.fresh_topics(f"soak-{name}", partitions)
            port = free_port() if name == "loom" else None
            capture = logs / f"{name}-{uuid.uuid4().hex[:6]}.memray" if heap else None
            extra: dict[str, object] = {"consumer": consumer}
            if name == "loom":
                extra |= {"observability": "on", "prometheus_port": port}
            if capture is not None:
                extra["memray"] = str(capture)
            spec = PeerSpec(name, PEER_LABELS[name], extra=extra)
            [config] = spec.configs(cluster, topics, f"soak-{name}-{uuid.uuid4().hex[:6]}")
            process = PeerProcess(name, config, logs, peer_env).start()
            stack.callback(process.stop)
            peer = SoakedPeer(name, broker, topics, process, port, capture, cluster.producer())
            stack.callback(peer.producer.flush, 10)
            peers.append(peer)
        yield peers


def soak(peers: list[SoakedPeer], rate: float, duration_s: float, sample_s: float) -> int:
    """Produce at ``rate`` into every peer's input, sampling; returns records sent per peer."""
    began = time.monotonic()
    end = began + duration_s
    next_sample = began + sample_s
    sent = 0
    while (now := time.monotonic()) < end:
        due = int(rate * (now - began))
        while sent < due:
            value, key = order_bytes(sent), record_id(sent).encode()
            for peer in peers:
                while True:
                    try:
                        peer.producer.produce(
                            peer.topics.input, value, key, on_delivery=peer.clock.delivered
                        )
                        break
                    except BufferError:
                        peer.producer.poll(0.01)
            sent += 1
        for peer in peers:
            peer.producer.poll(0)
        if now >= next_sample:
            line = "  ".join(_sample_text(peer, peer.sample(now - began)) for peer in peers)
            print(f"{now - began:6.0f} s  {line}", flush=True)
            next_sample += sample_s
        time.sleep(0.005)  # pacing the producer, not waiting for data
    return sent


def _sample_text(peer: SoakedPeer, sample: Sample) -> str:
    text = f"{peer.name} RSS {sample.rss_mib:6.1f} MiB (anon {sample.anon_mib:5.1f})"
    if peer.metrics_port is not None:
        text += f" in flight {sample.in_flight:6.0f}"
    text += f" | broker {sample.broker_rss_mib:5.0f} MiB, acks in {sample.slowest_input_s:4.2f} s"
    if sample.slowest_input_s > STALL_S:
        text += " STALL"
    return text


def heap_samples(capture: Path, began_epoch_s: float) -> list[tuple[float, float]]:
    """(seconds since the soak began, live heap MiB) from a memray capture."""
    import memray  # noqa: PLC0415 - only with --heap (bench/requirements.txt)

    reader = memray.FileReader(capture)
    return [
        (snapshot.time / 1000 - began_epoch_s, snapshot.heap / 2**20)
        for snapshot in reader.get_memory_snapshots()
    ]


def print_table(title: str, series: dict[str, list[float]]) -> float:
    """One drift table, Loom first, with Loom's median over each peer's; returns Loom's."""
    medians = {name: statistics.median(values) for name, values in series.items()}
    loom = medians["loom"]
    print(f"\n{title}")
    print(f"{'peer':<38}{'median':>10}{'min':>9}{'max':>9}{'drift':>17}  Loom/peer")
    for name, values in series.items():
        median, low, high = medians[name], min(values), max(values)
        drift = f"{(low - median) / median:+.1%} / {(high - median) / median:+.1%}"
        print(
            f"{PEER_LABELS[name]:<38}{median:>6.1f} MiB{low:>9.1f}{high:>9.1f}{drift:>17}"
            f"  {loom / median:8.2f}x"
        )
    return loom


def report(
    peers: list[SoakedPeer],
    warmup_s: float,
    duration_s: float,
    sent: int,
    began_epoch_s: float,
) -> int:
    rate = sent / duration_s
    print(f"\nafter warm-up ({warmup_s:.0f} s), input {rate:,.0f} records/s into each peer")
    rss = {p.name: [s.rss_mib for s in p.samples if s.elapsed_s >= warmup_s] for p in peers}
    if not all(rss.values()):
        print("no samples after warm-up: run longer than the warm-up")
        return 1
    loom_median = print_table("resident memory (RSS), the target", rss)
    anon = {p.name: [s.anon_mib for s in p.samples if s.elapsed_s >= warmup_s] for p in peers}
    print_table("anonymous part of the RSS (RssAnon: no mapped files)", anon)
    heaps = {
        p.name: [
            mib
            for t, mib in heap_samples(p.heap_capture, began_epoch_s)
            if warmup_s <= t <= duration_s
        ]
        for p in peers
        if p.heap_capture is not None
    }
    if heaps:
        print_table("live heap (memray: allocated and not yet freed)", heaps)
        print("(under --heap every RSS includes memray's own ~10 MiB: judge the target without it)")
    within = all(abs(value - loom_median) <= 0.1 * loom_median for value in rss["loom"])
    print(f"\nLoom RSS within ±10% of its median after warm-up: {'PASS' if within else 'MISS'}")
    tracked = [s.in_flight for s in peers[0].samples if s.elapsed_s >= warmup_s]
    print(
        f"Loom in-flight tracking: median {statistics.median(tracked):,.0f} records, "
        f"max {max(tracked):,.0f}"
    )
    for peer in peers:
        stalls = peer.stalls(warmup_s)
        longest = f", longest {max(stalls):.1f} s" if stalls else ""
        print(
            f"{peer.name}'s broker: {len(stalls)} stalled samples (input acknowledged after "
            f"more than {STALL_S:.0f} s){longest}; broker RSS at the end "
            f"{peer.samples[-1].broker_rss_mib:,.0f} MiB"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=2_000.0, help="records/s into each peer")
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--warmup-minutes", type=float, default=1.0)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument(
        "--peers", default="loom,plain", help="comma-separated; loom first (default loom,plain)"
    )
    parser.add_argument(
        "--consumer", type=json.loads, default={}, help="extra librdkafka consumer settings (JSON)"
    )
    parser.add_argument(
        "--heap", action="store_true", help="also track each peer's live heap with memray"
    )
    parser.add_argument(
        "--peer-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment for the peers only, not the brokers (repeatable), "
        "e.g. LD_PRELOAD=libjemalloc.so.2",
    )
    args = parser.parse_args()
    peer_env = dict(item.split("=", 1) for item in args.peer_env)
    names = [name.strip() for name in args.peers.split(",") if name.strip()]
    if names[:1] != ["loom"] or not set(names) <= set(PEER_LABELS):
        parser.error(f"--peers must start with loom and name peers among {', '.join(PEER_LABELS)}")
    with tempfile.TemporaryDirectory() as logs:
        with soaked_peers(
            names,
            Path(logs),
            partitions=args.partitions,
            consumer=args.consumer,
            heap=args.heap,
            peer_env=peer_env,
        ) as peers:
            began_epoch_s = time.time()
            sent = soak(peers, args.rate, args.minutes * 60, args.sample_s)
        # The peers have stopped: their heap captures are complete.
        return report(
            peers,
            args.warmup_minutes * 60,
            args.minutes * 60,
            sent,
            began_epoch_s,
        )


if __name__ == "__main__":
    sys.exit(main())
