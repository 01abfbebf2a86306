"""The peers, one per subprocess: ``python peers.py NAME CONFIG_JSON``.

Each runs until SIGTERM. All do the same work per record (``work.process``
or, for Loom, ``work.price`` between Loom's msgspec codecs) and produce the
result keyed by the input key:

- ``loom``: a ``StreamFlow`` on ``StreamingRunner``, at-least-once commits;
- ``bytewax``: bytewax's own ``KafkaSource -> map -> KafkaSink`` (commits nothing);
- ``quix``: a Quix Streams ``Application``, ``processing_guarantee="at-least-once"``;
- ``plain``: a confluent-kafka consume/produce loop that flushes and commits
  once per second (at-least-once, the practical limit).

Every peer commits (where it commits) about once per second.
"""

# Each peer imports only its own framework, inside its function, so no peer
# pays for (or is slowed by) another's imports.
# ruff: noqa: PLC0415

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from work import Order, PricedOrder, price, process

COMMIT_INTERVAL_S = 1.0
COMMON_CONSUMER = {"fetch.queue.backoff.ms": 10}
"""Consumer settings every peer gets. librdkafka's default fetch.queue.backoff.ms
(1000) pauses fetching for a second whenever the prefetch queue holds more than
queued.min.messages (100k); a consumer that drains that faster than a second
then starves, which made every peer's rate swing by 3x from run to run."""


def _apply_patch() -> None:
    """Import ``$LOOM_BENCH_PATCH`` (a .py file) to try a hot-path change unedited."""
    path = os.environ.get("LOOM_BENCH_PATCH")
    if path:
        import runpy

        runpy.run_path(path, run_name="loom_bench_patch")


def _gc_stats() -> None:
    """With ``$LOOM_BENCH_GC_STATS``, print the cyclic GC's count and time at exit."""
    if not os.environ.get("LOOM_BENCH_GC_STATS"):
        return
    import atexit
    import gc

    spent = [0.0, 0.0, 0]  # total seconds, start of the current collection, collections

    def timer(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            spent[1] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - spent[1]
            spent[2] += 1

    gc.callbacks.append(timer)
    atexit.register(
        lambda: print(f"LOOM_BENCH_GC {spent[2]} collections {spent[0]:.3f} s", flush=True)
    )


def run_loom(cfg: dict[str, Any]) -> None:
    _gc_stats()
    _apply_patch()
    from loom.streaming import FromTopic, IntoTopic, Process, RecordStep, StreamFlow
    from loom.streaming.bytewax.runner import StreamingRunner

    flow = StreamFlow(
        "bench-loom",
        source=FromTopic("input", payload=Order),
        process=Process(RecordStep(price)),
        output=IntoTopic("output", payload=PricedOrder),
        errors=IntoTopic("dlq"),
    )
    runtime: dict[str, Any] = {"workers_per_process": cfg["workers"]}
    if cfg.get("addresses"):
        runtime["process_id"] = cfg["process_id"]
        runtime["addresses"] = cfg["addresses"]
    config = {
        "kafka": {
            "bootstrap_servers": cfg["bootstrap"],
            "group_id": cfg["group"],
            "consumer": {
                "enable.auto.commit": False,
                "auto.commit.interval.ms": int(COMMIT_INTERVAL_S * 1000),
                **COMMON_CONSUMER,
                **cfg.get("consumer", {}),
            },
        },
        "topics": {"input": cfg["input"], "output": cfg["output"], "dlq": cfg["dlq"]},
        "streaming": {"runtime": runtime},
    }
    if "prometheus_port" in cfg:
        config["prometheus_port"] = cfg["prometheus_port"]
    observability = _observability(cfg.get("observability", "default"), config)
    config.pop("prometheus_port", None)
    # run() on the main thread turns SIGTERM into a graceful drain.
    StreamingRunner.from_dict(flow, config, observability_runtime=observability).run()


def _observability(mode: str, config: dict[str, Any]) -> Any:
    """``off``: run spans only; ``on``: SDK spans exported, metrics served; else the default."""
    from loom.observability import ObservabilityRuntime

    if mode == "off":
        return ObservabilityRuntime(instrument_dataflow=False)
    if mode != "on":
        return None
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Discard(SpanExporter):
        """Stands in for an OTLP collector: the spans are built and exported, then dropped."""

        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Discard()))
    config["observability"] = {"prometheus_port": config.get("prometheus_port", 0)}
    return ObservabilityRuntime(provider)


def run_bytewax(cfg: dict[str, Any]) -> None:
    import bytewax.operators as op
    from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
    from bytewax.dataflow import Dataflow
    from bytewax.run import cli_main

    brokers = [cfg["bootstrap"]]
    flow = Dataflow("bench_bytewax")
    messages = op.input(
        "in",
        flow,
        KafkaSource(brokers, [cfg["input"]], tail=True, add_config=dict(COMMON_CONSUMER)),
    )

    def work(message: Any) -> KafkaSinkMessage[bytes, bytes]:
        return KafkaSinkMessage(message.key, process(message.value))

    op.output("out", op.map("work", messages, work), KafkaSink(brokers, cfg["output"]))
    cli_main(
        flow,
        workers_per_process=cfg["workers"],
        process_id=cfg.get("process_id"),
        addresses=cfg.get("addresses"),
    )


def run_quix(cfg: dict[str, Any]) -> None:
    from quixstreams import Application

    app = Application(
        broker_address=cfg["bootstrap"],
        consumer_group=cfg["group"],
        auto_offset_reset="earliest",
        processing_guarantee="at-least-once",
        commit_interval=COMMIT_INTERVAL_S,
        consumer_extra_config={"session.timeout.ms": 6000, **COMMON_CONSUMER},
        auto_create_topics=False,
        use_changelog_topics=False,
        loglevel="WARNING",
    )
    source = app.topic(cfg["input"], key_deserializer="bytes", value_deserializer="bytes")
    sink = app.topic(cfg["output"], key_serializer="bytes", value_serializer="bytes")
    frame = app.dataframe(source)
    frame = frame.apply(process)
    frame.to_topic(sink)
    app.run()


def run_plain(cfg: dict[str, Any]) -> None:
    from confluent_kafka import OFFSET_STORED, Consumer, Producer, TopicPartition

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    topic, output = cfg["input"], cfg["output"]
    consumer = Consumer(
        {
            "bootstrap.servers": cfg["bootstrap"],
            "group.id": cfg["group"],
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "fetch.wait.max.ms": 100,
            **COMMON_CONSUMER,
        }
    )
    # The same client settings as Loom's producer.
    producer = Producer(
        {
            "bootstrap.servers": cfg["bootstrap"],
            "linger.ms": 5,
            "acks": "all",
            "enable.idempotence": True,
        }
    )
    workers = cfg["workers"] * cfg["processes"]
    me = cfg.get("process_id") or 0
    consumer.assign(
        [
            TopicPartition(topic, p, OFFSET_STORED)
            for p in range(cfg["partitions"])
            if p % workers == me
        ]
    )
    positions: dict[int, int] = {}
    produce, poll = producer.produce, producer.poll
    next_commit = time.monotonic() + COMMIT_INTERVAL_S

    def commit() -> None:
        if positions:
            producer.flush()  # everything consumed so far is delivered: safe to commit
            consumer.commit(
                offsets=[TopicPartition(topic, p, o) for p, o in positions.items()],
                asynchronous=True,
            )
            positions.clear()

    while not stopping:
        for message in consumer.consume(5000, timeout=0.05):
            if message.error() is not None:
                continue
            value = process(message.value())
            while True:
                try:
                    produce(output, value, message.key())
                    break
                except BufferError:
                    poll(0.05)
            positions[message.partition()] = message.offset() + 1
        poll(0)
        now = time.monotonic()
        if now >= next_commit:
            next_commit = now + COMMIT_INTERVAL_S
            commit()
    commit()
    producer.flush(10)
    consumer.close()


PEERS = {"loom": run_loom, "bytewax": run_bytewax, "quix": run_quix, "plain": run_plain}


def _heap_tracking(capture: str | None) -> contextlib.AbstractContextManager[object]:
    """With a path (``bench/soak.py --heap``), record the live heap with memray."""
    if capture is None:
        return contextlib.nullcontext()
    import memray

    return memray.Tracker(capture, memory_interval_ms=1000)


def main() -> None:
    name, config = sys.argv[1], json.loads(sys.argv[2])
    with _heap_tracking(config.get("memray")):
        PEERS[name](config)


if __name__ == "__main__":
    main()
