"""Poison input against a running service on the real broker (property-based)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings

from loom.devtools.broker import DevBroker
from loom.streaming import ErrorEnvelope
from loom.streaming.bytewax.runner import StreamingRunner
from tests.kafka.support import BackgroundRun, Cluster, TopicTail, wait_until
from tests.runtime.payloads import enrich_flow
from tests.runtime.test_poison_property import anything, is_valid


@pytest.fixture(scope="module")
def running_service(broker: DevBroker) -> Iterator[tuple[Cluster, dict[str, TopicTail]]]:
    """One service for every example: it must survive them all."""
    cluster = Cluster(broker.bootstrap_servers)
    topics = {name: cluster.topic(3, name) for name in ("input", "output", "dlq")}
    config = cluster.flow_config(topics)
    tails = {name: TopicTail(cluster, topic) for name, topic in topics.items()}
    with BackgroundRun(StreamingRunner.from_dict(enrich_flow(), config)) as run:
        yield cluster, tails
        assert run.thread.is_alive(), f"the service stopped: {run.error!r}"
    for tail in tails.values():
        tail.close()


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(values=anything)
def test_the_service_keeps_running_and_dead_letters_every_bad_record(
    running_service: tuple[Cluster, dict[str, TopicTail]], values: list[bytes | None]
) -> None:
    cluster, tails = running_service
    batch = uuid.uuid4().hex.encode()
    keys = [batch + b"-%d" % index for index in range(len(values))]
    input_topic = tails["input"].topic
    cluster.produce(input_topic, values, keys=keys)
    bad = [(key, value) for key, value in zip(keys, values, strict=True) if not is_valid(value)]
    good = len(values) - len(bad)

    def mine(topic: str) -> list[Any]:
        return [m for m in tails[topic].poll() if m.key().startswith(batch)]

    wait_until(
        lambda: len(mine("output")) == good and len(mine("dlq")) == len(bad),
        30,
        f"{good} outputs and {len(bad)} dead letters",
    )
    letters = {m.key(): msgspec.json.decode(m.value(), type=ErrorEnvelope) for m in mine("dlq")}
    for key, value in bad:
        envelope = letters[key]
        assert envelope.value == value
        assert envelope.topic == input_topic
        assert envelope.key == key
