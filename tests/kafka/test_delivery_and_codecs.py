"""Producer back-pressure, refused records, and the wire formats on a real broker."""

from __future__ import annotations

from typing import Any

import msgspec

from loom.streaming import (
    ErrorEnvelope,
    ErrorKind,
    FromTopic,
    IntoTopic,
    Message,
    Process,
    RecordStep,
    StreamFlow,
)
from loom.streaming.bytewax.runner import StreamingRunner
from tests.kafka.support import BackgroundRun, Cluster, wait_until
from tests.runtime.payloads import Enriched, Order, enrich, enrich_flow


def new_topics(cluster: Cluster, partitions: int = 1) -> dict[str, str]:
    return {name: cluster.topic(partitions, name) for name in ("input", "output", "dlq")}


def run_until_committed(
    cluster: Cluster, flow: StreamFlow[Any, Any], config: dict[str, Any], total: int
) -> None:
    topic = config["topics"]["input"]
    ends = cluster.end_offsets(topic, total)
    with BackgroundRun(StreamingRunner.from_dict(flow, config)) as run:
        wait_until(
            lambda: cluster.committed(config["kafka"]["group_id"], topic) == ends,
            60,
            "every input offset committed",
        )
        run.stop()


def test_a_full_producer_queue_slows_the_flow_down_instead_of_crashing_it(
    cluster: Cluster,
) -> None:
    topics = new_topics(cluster, 2)
    total = 3000
    cluster.produce(topics["input"], [msgspec.json.encode(Order(f"o{i}", i)) for i in range(total)])
    config = cluster.flow_config(topics, kafka={"producer": {"queue.buffering.max.messages": 20}})
    run_until_committed(cluster, enrich_flow(), config, total)
    assert len(cluster.read(topics["output"], total)) == total


def test_a_record_the_broker_refuses_for_good_is_a_delivery_error(cluster: Cluster) -> None:
    topics = new_topics(cluster)

    def inflate(order: Order) -> Order:
        return Order(order.id * 5000, order.amount) if order.id == "big" else order

    cluster.produce(
        topics["input"],
        [msgspec.json.encode(Order(name, 1)) for name in ("a", "big", "b")],
    )
    config = cluster.flow_config(topics, kafka={"producer": {"message.max.bytes": 4096}})
    run_until_committed(cluster, enrich_flow(RecordStep(inflate), RecordStep(enrich)), config, 3)
    assert [m.value() for m in cluster.read(topics["output"], 2)] == [
        b'{"id":"a","amount":1.0,"large":false}',
        b'{"id":"b","amount":1.0,"large":false}',
    ]
    [dead] = cluster.read(topics["dlq"], 1)
    envelope = msgspec.json.decode(dead.value(), type=ErrorEnvelope)
    assert (envelope.kind, envelope.offset) == (ErrorKind.DELIVERY, 1)
    assert envelope.value == msgspec.json.encode(Order("big", 1))


def test_msgpack_in_and_out_keeps_keys_and_headers(cluster: Cluster) -> None:
    topics = new_topics(cluster)
    flow = StreamFlow(
        "packed",
        source=FromTopic("input", payload=Order, codec="msgpack"),
        process=Process(RecordStep(enrich)),
        output=IntoTopic("output", payload=Enriched, codec="msgpack"),
        errors=IntoTopic("dlq"),
    )
    cluster.produce(
        topics["input"],
        [msgspec.msgpack.encode(Order("m", 2.5)), b"\xc1 not msgpack"],
        keys=[b"key-m", b"key-x"],
        headers=[("tenant", b"acme")],
    )
    run_until_committed(cluster, flow, cluster.flow_config(topics), 2)
    [out] = cluster.read(topics["output"], 1)
    assert msgspec.msgpack.decode(out.value(), type=Enriched) == Enriched("m", 2.5, False)
    assert out.key() == b"key-m"
    assert ("tenant", b"acme") in out.headers()
    [dead] = cluster.read(topics["dlq"], 1)
    assert msgspec.json.decode(dead.value(), type=ErrorEnvelope).value == b"\xc1 not msgpack"


def test_raw_bytes_pass_through_untouched(cluster: Cluster) -> None:
    topics = new_topics(cluster)

    def shout(message: Message[bytes]) -> Message[bytes]:
        return Message(message.payload.upper(), key=b"new-key", headers=message.headers)

    flow = StreamFlow(
        "raw",
        source=FromTopic("input", codec="raw"),
        process=Process(RecordStep(shout)),
        output=IntoTopic("output", codec="raw"),
        errors=IntoTopic("dlq"),
    )
    cluster.produce(topics["input"], [b"\x00bytes\xff"], keys=[b"k"], headers=[("h", b"1")])
    run_until_committed(cluster, flow, cluster.flow_config(topics), 1)
    [out] = cluster.read(topics["output"], 1)
    assert (out.value(), out.key(), out.headers()) == (b"\x00BYTES\xff", b"new-key", [("h", b"1")])
