"""Demo: an order-enrichment flow run on the real Bytewax runtime.

Records are in memory (``loom.streaming.testing``); everything else — the
compiler, the dataflow, acks and commits — is what a service runs in
production. Prints what happened: records out, dead letters, commits.
"""

from __future__ import annotations

import time

import msgspec

from loom.streaming import (
    BusinessError,
    FromTopic,
    IntoTopic,
    Process,
    RecordStep,
    StreamFlow,
)
from loom.streaming.testing import TestRunner


class Order(msgspec.Struct, frozen=True):
    id: str
    amount: float


class PricedOrder(msgspec.Struct, frozen=True):
    id: str
    amount: float
    amount_with_vat: float
    tier: str


def price(order: Order) -> PricedOrder:
    if order.amount < 0:
        raise BusinessError(f"order {order.id} has a negative amount")
    tier = "large" if order.amount >= 1000 else "standard"
    return PricedOrder(order.id, order.amount, round(order.amount * 1.2, 2), tier)


flow = StreamFlow(
    "orders-demo",
    source=FromTopic("input", payload=Order),
    process=Process(RecordStep(price)),
    output=IntoTopic("output", payload=PricedOrder),
    errors=IntoTopic("dlq"),
)


def main(count: int = 50_000) -> None:
    tester = TestRunner(flow, partitions=3)
    for index in range(count):
        tester.send(Order(f"order-{index}", float(index % 2000)), key=f"order-{index}")
    tester.send(b"this is not json")
    tester.send(b'{"id": 7, "amount": "seven"}')
    tester.send(Order("refund-1", -10.0))
    started = time.perf_counter()
    result = tester.run()
    elapsed = time.perf_counter() - started
    out, dead = result.records("output"), result.dead_letters("dlq")
    print(f"records in:        {count + 3}")
    print(f"records out:       {len(out)}  (first: {out[0].value_bytes.decode()})")
    print(f"dead-lettered:     {len(dead)}")
    for envelope in dead:
        print(f"  - {envelope.kind.value:<8} at {envelope.node}: {envelope.message[:70]}")
    print(f"committed offsets: {result.committed('input')}")
    print(f"throughput:        {(count + 3) / elapsed:,.0f} records/s (incl. Bytewax start-up)")


if __name__ == "__main__":
    main()
