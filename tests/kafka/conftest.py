"""Fixtures for tests against a real Kafka-protocol broker."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loom.devtools.broker import DevBroker
from tests.kafka.support import Cluster


@pytest.fixture(scope="session")
def broker() -> Iterator[DevBroker]:
    with DevBroker() as running:
        yield running


@pytest.fixture
def cluster(broker: DevBroker) -> Cluster:
    return Cluster(broker.bootstrap_servers)
