"""Stateful peers, one per subprocess: ``python stateful_peers.py NAME CONFIG_JSON``.

Run by ``bench/windows.py``. Each runs until SIGTERM. ``CONFIG["flow"]`` says
what it computes:

- ``window``: per key, the count and the sum of ``amount`` in epoch-aligned
  tumbling event-time windows of ``window_ms`` (the Kafka record timestamp is
  the event time), one result per (key, window) once the window has closed;
- ``dedup``: drop every record whose id (the Kafka key) was seen before;
- ``passthrough``: every record unchanged (Loom only: the stateless baseline).

Peers (``NAME``): ``loom`` (``WindowAggregate`` / ``StatefulStep`` /
``RecordStep`` on ``StreamingRunner``), ``bytewax`` (bytewax's own
``EventClock + TumblingWindower + fold_window`` / ``stateful_map`` between
``KafkaSource`` and ``KafkaSink``) and ``quix`` (Quix Streams'
``tumbling_window(...).agg(count=Count(), sum=Sum()).final()`` / a stateful
``filter``).

Every peer decodes the same msgspec ``Struct`` (``Reading`` or ``Event``)
and encodes its results with msgspec. The struct's ``__post_init__`` (which
msgspec calls on every decode, in every peer alike) writes the wall-clock
time of the first record decoded to ``CONFIG["first_read_file"]``: the
harness's clock starts there.
"""

# Each peer imports only its own framework, inside its function.
# ruff: noqa: PLC0415

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from datetime import UTC

from peers import COMMIT_INTERVAL_S, COMMON_CONSUMER

# -- the first record read ----------------------------------------------------

_first_read: list[str] = []
"""The file to stamp on the first decode; emptied once stamped."""


def _stamp_first_read() -> None:
    path = _first_read.pop()
    Path(path).write_text(repr(time.time()))


def watch_first_read(path: str | None) -> None:
    _first_read.clear()
    if path:
        _first_read.append(path)


# -- records ------------------------------------------------------------------


class Reading(msgspec.Struct):
    """A window benchmark input record (~60 bytes of JSON), keyed by ``key``."""

    id: str
    key: str
    amount: int

    def __post_init__(self) -> None:
        if _first_read:
            _stamp_first_read()


class Event(msgspec.Struct):
    """A dedup benchmark input record (~80 bytes of JSON), keyed by ``id``."""

    id: str
    customer: str
    amount: int
    country: str

    def __post_init__(self) -> None:
        if _first_read:
            _stamp_first_read()


class WindowStats(msgspec.Struct):
    """One window's result, as Loom and Bytewax emit it (Quix: its own dict)."""

    key: str
    start_ms: int
    end_ms: int
    count: int
    sum: int


decode_reading = msgspec.json.Decoder(Reading).decode
decode_event = msgspec.json.Decoder(Event).decode
encode = msgspec.json.Encoder().encode


def _text(key: Any) -> str:
    return key.decode() if isinstance(key, bytes | bytearray) else str(key)


# -- Loom ---------------------------------------------------------------------


class CountSum:
    """Loom aggregate: (count, sum of amount) per key and window."""

    def initial(self) -> tuple[int, int]:
        return (0, 0)

    def add(self, acc: tuple[int, int], value: Reading) -> tuple[int, int]:
        return (acc[0] + 1, acc[1] + value.amount)

    def merge(self, a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
        return (a[0] + b[0], a[1] + b[1])

    def result(self, key: Any, window: Any, acc: tuple[int, int]) -> WindowStats:
        return WindowStats(_text(key), window.start_ms, window.end_ms, acc[0], acc[1])


def dedup(seen: bool | None, event: Event) -> tuple[bool, Event | None]:
    """StatefulStep: the first record of an id passes, later ones are dropped."""
    if seen is None:
        return True, event
    return True, None


def passthrough(event: Event) -> Event:
    return event


def run_loom(cfg: dict[str, Any]) -> None:
    from loom.streaming import (
        FromTopic,
        IntoTopic,
        Process,
        RecordStep,
        StatefulStep,
        StreamFlow,
        Tumbling,
        WindowAggregate,
    )
    from loom.streaming.bytewax.runner import StreamingRunner

    flow_kind = cfg["flow"]
    if flow_kind == "window":
        source = FromTopic("input", payload=Reading)
        step: Any = WindowAggregate(Tumbling(cfg["window_ms"]), CountSum())
        output = IntoTopic("output", payload=WindowStats)
    else:
        source = FromTopic("input", payload=Event)
        step = StatefulStep(dedup) if flow_kind == "dedup" else RecordStep(passthrough)
        output = IntoTopic("output", payload=Event)
    flow = StreamFlow(
        f"bench-{flow_kind}",
        source=source,
        process=Process(step),
        output=output,
        errors=IntoTopic("dlq"),
    )
    config: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": cfg["bootstrap"],
            "group_id": cfg["group"],
            "consumer": {
                "enable.auto.commit": False,
                "auto.commit.interval.ms": int(COMMIT_INTERVAL_S * 1000),
                **COMMON_CONSUMER,
            },
        },
        "topics": {"input": cfg["input"], "output": cfg["output"], "dlq": cfg["dlq"]},
        "streaming": {"runtime": {"workers_per_process": 1}},
    }
    if flow_kind != "passthrough":
        if cfg.get("state_dir"):
            config["state"] = {"dir": cfg["state_dir"]}
        else:
            config["state"] = {"durability": "volatile"}
    StreamingRunner.from_dict(flow, config).run()


# -- Bytewax ------------------------------------------------------------------


def run_bytewax(cfg: dict[str, Any]) -> None:
    from datetime import datetime, timedelta

    import bytewax.operators as op
    from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource
    from bytewax.dataflow import Dataflow
    from bytewax.run import cli_main

    brokers = [cfg["bootstrap"]]
    flow = Dataflow(f"bench_bytewax_{cfg['flow']}")
    messages = op.input(
        "in",
        flow,
        KafkaSource(brokers, [cfg["input"]], tail=True, add_config=dict(COMMON_CONSUMER)),
    )
    if cfg["flow"] == "window":
        from bytewax.operators.windowing import EventClock, TumblingWindower, fold_window

        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        size_ms = cfg["window_ms"]

        def keyed(message: Any) -> tuple[str, tuple[int, datetime]]:
            reading = decode_reading(message.value)
            return reading.key, (
                reading.amount,
                epoch + timedelta(milliseconds=message.timestamp[1]),
            )

        # Event time only, like Loom while it has a backlog and Quix Streams:
        # the watermark is the latest record timestamp of the key (the clock is
        # per key in Bytewax). Bytewax's default ``now_getter`` would also
        # advance it with the wall clock, dropping records whose event-time
        # gap to the key's previous record is shorter than the wall-clock gap
        # between reading them, and its default ``to_system_utc`` would
        # schedule a wake-up per key in the past (the data is historical)
        # after every batch. Windows close on the next record of their key.
        frozen = datetime.now(UTC)
        clock = EventClock(
            lambda item: item[1],
            wait_for_system_duration=timedelta(0),
            now_getter=lambda: frozen,
            to_system_utc=lambda _ts: None,
        )
        windower = TumblingWindower(length=timedelta(milliseconds=size_ms), align_to=epoch)

        def fold(acc: tuple[int, int], item: tuple[int, datetime]) -> tuple[int, int]:
            return (acc[0] + 1, acc[1] + item[0])

        def merge(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
            return (a[0] + b[0], a[1] + b[1])

        windows = fold_window(
            "count_sum",
            op.map("decode", messages, keyed),
            clock,
            windower,
            lambda: (0, 0),
            fold,
            merge,
        )

        def to_sink(item: tuple[str, tuple[int, tuple[int, int]]]) -> KafkaSinkMessage:
            key, (window_id, (count, total)) = item
            start = window_id * size_ms
            stats = WindowStats(key, start, start + size_ms, count, total)
            return KafkaSinkMessage(key.encode(), encode(stats))

        out = op.map("encode", windows.down, to_sink)
    else:

        def by_id(message: Any) -> tuple[str, Event]:
            event = decode_event(message.value)
            return event.id, event

        def first(seen: bool | None, event: Event) -> tuple[bool, Event | None]:
            return True, (event if seen is None else None)

        firsts = op.stateful_map("dedup", op.map("decode", messages, by_id), first)
        kept = op.filter("kept", firsts, lambda item: item[1] is not None)
        out = op.map(
            "encode", kept, lambda item: KafkaSinkMessage(item[0].encode(), encode(item[1]))
        )
    op.output("out", out, KafkaSink(brokers, cfg["output"]))
    cli_main(flow, workers_per_process=1)


# -- Quix Streams --------------------------------------------------------------


def run_quix(cfg: dict[str, Any]) -> None:
    from quixstreams import Application
    from quixstreams.dataframe.windows.aggregations import Count, Sum
    from quixstreams.models.serializers import Deserializer, Serializer

    class AmountOf(Deserializer):
        """The same msgspec decode as every peer; the window sums the value itself."""

        def __call__(self, value: bytes, ctx: Any) -> int:
            return decode_reading(value).amount

    class EventOf(Deserializer):
        def __call__(self, value: bytes, ctx: Any) -> Event:
            return decode_event(value)

    class Msgspec(Serializer):
        def __call__(self, value: Any, ctx: Any) -> bytes:
            return encode(value)

    app = Application(
        broker_address=cfg["bootstrap"],
        consumer_group=cfg["group"],
        auto_offset_reset="earliest",
        processing_guarantee="at-least-once",
        commit_interval=COMMIT_INTERVAL_S,
        consumer_extra_config={"session.timeout.ms": 6000, **COMMON_CONSUMER},
        auto_create_topics=False,
        use_changelog_topics=False,
        state_dir=cfg["state_dir"],
        loglevel="WARNING",
    )
    sink = app.topic(cfg["output"], key_serializer="bytes", value_serializer=Msgspec())
    if cfg["flow"] == "window":
        source = app.topic(cfg["input"], key_deserializer="bytes", value_deserializer=AmountOf())
        frame = (
            app.dataframe(source)
            .tumbling_window(duration_ms=cfg["window_ms"])
            .agg(count=Count(), sum=Sum())
            .final()
        )
    else:
        source = app.topic(cfg["input"], key_deserializer="bytes", value_deserializer=EventOf())

        def first(event: Event, state: Any) -> bool:
            if state.get("seen"):
                return False
            state.set("seen", True)
            return True

        frame = app.dataframe(source).filter(first, stateful=True)
    frame.to_topic(sink)
    app.run()


PEERS = {"loom": run_loom, "bytewax": run_bytewax, "quix": run_quix}


def main() -> None:
    name, config = sys.argv[1], json.loads(sys.argv[2])
    watch_first_read(config.get("first_read_file"))
    PEERS[name](config)


if __name__ == "__main__":
    main()
