"""The broker becomes unreachable mid-stream; the service rides it out."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import msgspec
import pytest

from loom.devtools.broker import DevBroker
from tests.kafka.process import ServiceProcess, free_port, service_env
from tests.kafka.proxy import PausableProxy
from tests.kafka.support import Cluster, wait_until
from tests.runtime.payloads import Enriched, Order

OUTAGE_S = 10


@pytest.fixture
def proxied() -> Iterator[tuple[Cluster, PausableProxy]]:
    """A broker reached only through a proxy (it advertises the proxy's port)."""
    proxy_port = free_port()
    with DevBroker(advertised_port=proxy_port) as broker:
        proxy = PausableProxy(proxy_port, broker.port).start()
        try:
            yield Cluster(f"127.0.0.1:{proxy_port}"), proxy
        finally:
            proxy.stop()


@pytest.mark.slow
def test_a_ten_second_broker_outage_loses_nothing(proxied: tuple[Cluster, PausableProxy]) -> None:
    cluster, proxy = proxied
    total = 20_000
    topics = {name: cluster.topic(2, name) for name in ("input", "output", "dlq")}
    group = f"outage-{uuid.uuid4().hex[:6]}"
    cluster.produce(topics["input"], [msgspec.json.encode(Order(f"o{i}", i)) for i in range(total)])
    ends = cluster.end_offsets(topics["input"], total)
    env = service_env(cluster, topics, group, SERVICE_APP_SLOW_US=500)
    with ServiceProcess(env) as service:
        service.wait_ready()
        wait_until(
            lambda: 0 < sum(cluster.committed(group, topics["input"]).values()) < total,
            60,
            "processing under way",
        )
        proxy.pause()
        outage_end = time.monotonic() + OUTAGE_S
        while time.monotonic() < outage_end:  # the outage itself, not a wait for data
            assert service.process.poll() is None, "the service died during the outage"
            time.sleep(0.5)
        proxy.resume()
        wait_until(
            lambda: cluster.committed(group, topics["input"]) == ends,
            120,
            "every offset committed after the outage",
        )
        assert service.terminate() == 0
    ids = {
        msgspec.json.decode(r.value(), type=Enriched).id
        for r in cluster.read(topics["output"], total, timeout_s=60)
    }
    assert ids == {f"o{i}" for i in range(total)}
