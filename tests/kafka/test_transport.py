"""A flow reading from and writing to a real broker, committing finished work only."""

from __future__ import annotations

import msgspec
import pytest

from loom.config.context import KafkaSettings
from loom.config.settings import SettingsError, describe
from loom.streaming import ErrorEnvelope, ExpandStep, RecordStep
from loom.streaming.bytewax.runner import StreamingRunner
from loom.transports.kafka import KafkaTransport
from tests.kafka.support import BackgroundRun, Cluster, TopicTail, wait_until
from tests.runtime.payloads import Enriched, Order, enrich, enrich_flow


def order_bytes(count: int) -> list[bytes]:
    return [msgspec.json.encode(Order(f"o{i}", float(i))) for i in range(count)]


def test_records_flow_from_input_to_output_and_offsets_are_committed(cluster: Cluster) -> None:
    topics = {"input": cluster.topic(3), "output": cluster.topic(3), "dlq": cluster.topic(1)}
    settings = cluster.flow_config(topics)
    cluster.produce(topics["input"], order_bytes(3000), keys=[b"k%d" % i for i in range(3000)])
    runner = StreamingRunner.from_dict(enrich_flow(), settings)
    with BackgroundRun(runner) as run:
        out = cluster.read(topics["output"], 3000)
        group = settings["kafka"]["group_id"]
        wait_until(
            lambda: sum(cluster.committed(group, topics["input"]).values()) == 3000,
            20,
            "all 3000 offsets committed",
        )
        run.stop()
    decoded = [msgspec.json.decode(m.value(), type=Enriched) for m in out]
    assert sorted(e.id for e in decoded) == sorted(f"o{i}" for i in range(3000))
    assert {m.key() for m in out} == {b"k%d" % i for i in range(3000)}


def test_a_caught_up_flow_commits_without_waiting_for_the_commit_interval(
    cluster: Cluster,
) -> None:
    topics = {"input": cluster.topic(2), "output": cluster.topic(2), "dlq": cluster.topic(1)}
    settings = cluster.flow_config(
        topics,
        kafka={"consumer": {"enable.auto.commit": False, "auto.commit.interval.ms": 600_000}},
    )
    group = settings["kafka"]["group_id"]
    cluster.produce(topics["input"], order_bytes(500))
    with BackgroundRun(StreamingRunner.from_dict(enrich_flow(), settings)) as run:
        cluster.read(topics["output"], 500)
        # The interval is ten minutes: only the idle commit can get there in time.
        wait_until(
            lambda: sum(cluster.committed(group, topics["input"]).values()) == 500,
            10,
            "the idle flow's offsets committed",
        )
        run.stop()


def test_poison_records_go_to_the_dlq_with_their_bytes_and_the_flow_keeps_going(
    cluster: Cluster,
) -> None:
    topics = {"input": cluster.topic(1), "output": cluster.topic(1), "dlq": cluster.topic(1)}
    cluster.produce(topics["input"], [b"{bad", None, *order_bytes(5)])
    runner = StreamingRunner.from_dict(enrich_flow(), cluster.flow_config(topics))
    with BackgroundRun(runner) as run:
        out = cluster.read(topics["output"], 5)
        dead = cluster.read(topics["dlq"], 2)
        run.stop()
    assert len(out) == 5
    envelopes = [msgspec.json.decode(m.value(), type=ErrorEnvelope) for m in dead]
    assert [(e.value, e.offset) for e in envelopes] == [(b"{bad", 0), (None, 1)]
    assert dict(dead[0].headers())["loom-source-topic"] == topics["input"].encode()


def test_a_restarted_flow_resumes_from_the_committed_offsets(cluster: Cluster) -> None:
    topics = {"input": cluster.topic(2), "output": cluster.topic(2), "dlq": cluster.topic(1)}
    settings = cluster.flow_config(topics)
    cluster.produce(topics["input"], order_bytes(100))
    with BackgroundRun(StreamingRunner.from_dict(enrich_flow(), settings)) as run:
        cluster.read(topics["output"], 100)
        run.stop()
    cluster.produce(topics["input"], order_bytes(50))
    with BackgroundRun(StreamingRunner.from_dict(enrich_flow(), settings)) as run:
        out = cluster.read(topics["output"], 150)
        run.stop()
    assert len(out) == 150  # the first 100 were not processed again


def test_filtered_and_expanded_records_commit_to_the_end(cluster: Cluster) -> None:
    topics = {"input": cluster.topic(2), "output": cluster.topic(2), "dlq": cluster.topic(1)}
    settings = cluster.flow_config(topics)
    cluster.produce(topics["input"], order_bytes(400))

    def fan(order: Order) -> list[Order]:
        return [order] * (int(order.amount) % 3)  # 0, 1 or 2 children

    ends = cluster.end_offsets(topics["input"], 400)
    flow = enrich_flow(ExpandStep(fan), RecordStep(enrich))
    with BackgroundRun(StreamingRunner.from_dict(flow, settings)) as run:
        expected = sum(i % 3 for i in range(400))
        out = cluster.read(topics["output"], expected)
        group = settings["kafka"]["group_id"]
        wait_until(
            lambda: cluster.committed(group, topics["input"]) == ends,
            20,
            "commits up to the end offsets",
        )
        run.stop()
    assert len(out) == expected


def test_error_events_in_a_poll_do_not_stop_the_flow(cluster: Cluster) -> None:
    topics = {"input": cluster.topic(2), "output": cluster.topic(2), "dlq": cluster.topic(1)}
    settings = cluster.flow_config(topics)
    # Every time a partition is read to its end, the poll carries an error event.
    settings["kafka"]["consumer"]["enable.partition.eof"] = True
    output = TopicTail(cluster, topics["output"])
    with BackgroundRun(StreamingRunner.from_dict(enrich_flow(), settings)) as run:
        cluster.produce(topics["input"], order_bytes(10))
        wait_until(lambda: len(output.poll()) == 10, 20, "the first 10 outputs")
        cluster.produce(topics["input"], order_bytes(10))
        wait_until(lambda: len(output.poll()) == 20, 20, "10 more after end-of-partition events")
        assert run.thread.is_alive()
        run.stop()
    output.close()


def test_a_transport_without_a_consumer_group_refuses_to_start(cluster: Cluster) -> None:
    settings = KafkaSettings(bootstrap_servers=cluster.bootstrap)
    with pytest.raises(SettingsError) as refused:
        KafkaTransport(settings)
    [problem] = refused.value.problems
    assert problem.startswith("kafka.group_id: required")
    [named] = describe(refused.value)
    assert named.startswith("LOOM_KAFKA__GROUP_ID: required")
