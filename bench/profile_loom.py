"""Profile the Loom peer with py-spy and say where its time goes.

    .venv/bin/python bench/profile_loom.py [--records 1000000] [--partitions 3]
        [--rate 200] [--native] [--output profile.txt]

Runs the same Loom flow as ``run.py`` on a fresh broker, attaches py-spy to
the peer once the first output record appears (start-up is not profiled),
stops sampling once every record is out and committed, and prints the
self time and inclusive time per function, plus a breakdown by component
(Bytewax runtime, Loom source/operators/sinks, confluent-kafka calls,
msgspec, the user's function). The raw collapsed stacks can be kept with
``--output`` for a flame graph tool.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from confluent_kafka import TopicPartition
from harness import (
    BenchError,
    Cluster,
    OutputWatch,
    PeerProcess,
    PeerSpec,
    process_cpu_s,
    wait_for,
)

from loom.devtools.broker import DevBroker

COMPONENTS = (
    # (label, substrings of a frame); a sample belongs to the first component that
    # matches, walking from the leaf frame towards the root.
    ("user work: work.price", ("price (work.py",)),
    (
        "msgspec decode via the codec (inline in _decode once direct)",
        ("decode (loom/streaming/codecs.py",),
    ),
    ("msgspec encode (codec)", ("encode (loom/streaming/codecs.py",)),
    ("delivery callbacks", ("_delivered (loom/transports/kafka.py",)),
    ("DeliveryWindow: confirming produced records", ("DeliveryWindow.",)),
    (
        "KafkaWriter.write: produce(), per-record callbacks, freeing records",
        ("write (loom/transports/kafka.py",),
    ),
    ("KafkaWriter.poll: serving delivery reports", ("KafkaWriter.poll (",)),
    ("KafkaReader.poll: consume()", ("KafkaReader.poll",)),
    ("Loom acks (track/advance/release)", ("loom/delivery/acks.py",)),
    (
        "Loom records (Rec, OutRecord, headers/key)",
        ("loom/streaming/bytewax/records.py", "<string>"),
    ),
    ("Loom source loop (_decode, commits)", ("loom/streaming/bytewax/source.py",)),
    ("Loom operators (RecordOp, EncodeOp)", ("loom/streaming/bytewax/operators.py",)),
    ("Loom sinks", ("loom/streaming/bytewax/outputs.py",)),
    (
        "Bytewax runtime (Rust, between Python calls)",
        ("_execute (loom/streaming/bytewax/runner.py",),
    ),
    ("Loom other", ("loom/",)),
)


def _which_pyspy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is not installed: pip install --no-deps -r bench/requirements.txt")
    return found


def _pyspy_command(pid: int, args: argparse.Namespace, raw_path: Path) -> list[str]:
    command = [
        _which_pyspy(),
        "record",
        "--pid",
        str(pid),
        "--rate",
        str(args.rate),
        "--format",
        "raw",
        "--output",
        str(raw_path),
    ]
    if args.native:
        command.append("--native")
    return command


def _stop_spy(spy: subprocess.Popen[bytes], raw_path: Path) -> None:
    """SIGINT makes py-spy stop sampling and write its output."""
    spy.send_signal(signal.SIGINT)
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if spy.returncode not in (0, -signal.SIGINT) and not raw_path.exists():
        print(err.decode(errors="replace"), file=sys.stderr)


def profile(args: argparse.Namespace, raw_path: Path) -> None:
    with DevBroker() as broker:
        cluster = Cluster(broker.bootstrap_servers)
        spec = PeerSpec("loom", "loom", workers=args.workers)
        topics = cluster.fresh_topics("profile", args.partitions)
        group = f"profile-{uuid.uuid4().hex[:8]}"
        cluster.produce_inputs(topics.input, args.records)
        watch = OutputWatch(cluster, topics)
        peer = PeerProcess("loom", spec.configs(cluster, topics, group)[0], raw_path.parent)
        spy = None
        try:
            os.environ["LOOM_BENCH_GC_STATS"] = "1"
            peer.start()
            deadline = time.monotonic() + 120
            while watch.count == 0:
                watch.poll(0.02)
                peer.check_alive()
                if time.monotonic() > deadline:
                    raise BenchError("no output within 120 s")
            assert peer.process is not None
            command = _pyspy_command(peer.process.pid, args, raw_path)
            spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            began = time.monotonic()
            cpu_began = process_cpu_s(peer.process.pid, main_thread_only=True)
            while watch.count < args.records:
                watch.poll(0.05)
                peer.check_alive()
                if time.monotonic() > deadline + args.records / 2000:
                    raise BenchError(f"only {watch.count} of {args.records} records out")
            with cluster.consumer(group) as offsets:
                tps = [TopicPartition(topics.input, p) for p in range(args.partitions)]
                wait_for(
                    lambda: (
                        sum(tp.offset for tp in offsets.committed(tps, timeout=5)) >= args.records
                    ),
                    30,
                    "all offsets committed",
                )
            seconds = time.monotonic() - began
            cpu = process_cpu_s(peer.process.pid, main_thread_only=True) - cpu_began
            print(
                f"profiled {seconds:.2f} s of processing ({watch.count} records out); "
                f"the worker thread used {cpu:.2f} s CPU, "
                f"{1e6 * cpu / args.records:.2f} us per record"
            )
        finally:
            if spy is not None:
                _stop_spy(spy, raw_path)
            peer.stop()
            watch.close()
            gc_lines = [line for line in peer.log_tail(50).splitlines() if "LOOM_BENCH_GC" in line]
            if gc_lines:
                print(
                    "cyclic GC over the whole peer run (py-spy cannot see it; its time is "
                    f"spread over the allocating lines): {gc_lines[-1].split(' ', 1)[1]}"
                )


_LINE = re.compile(r":\d+\)$")


def _frames(stack: str) -> list[str]:
    """Frames of one collapsed stack, ``fn (file.py:12)`` -> ``fn (file.py)``."""
    return [_LINE.sub(")", frame) for frame in stack.split(";")]


def _component(frames: list[str]) -> str:
    for frame in reversed(frames):
        for label, needles in COMPONENTS:
            if any(needle in frame for needle in needles):
                return label
    return "other"


def summarise(raw_path: Path, top: int) -> None:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    components: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = _frames(stack)
        total += count
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        components[_component(frames)] += count
    if not total:
        print("no samples")
        return

    def table(title: str, counter: collections.Counter[str]) -> None:
        print(f"\n{title}")
        for name, count in counter.most_common(top):
            print(f"  {100 * count / total:5.1f}%  {name}")

    print(f"{total} samples")
    table("by component (the innermost frame that names one; see COMPONENTS)", components)
    table("self time (leaf frames)", self_time)
    table("inclusive time", inclusive)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="include native (Rust/C) frames")
    parser.add_argument("--output", type=Path, help="keep the raw collapsed stacks here")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--summarise", type=Path, help="only summarise this saved raw file")
    args = parser.parse_args()
    if args.summarise is not None:
        summarise(args.summarise, args.top)
        return
    raw_path = args.output or Path(f"/tmp/loom-profile-{uuid.uuid4().hex[:6]}.txt")
    raw_path.parent.mkdir(parents=True, exist_ok=True)
    profile(args, raw_path)
    summarise(raw_path, args.top)
    print(f"\nraw stacks: {raw_path}")


if __name__ == "__main__":
    main()
