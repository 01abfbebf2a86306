"""Payload types and flows shared by the runtime tests."""

from __future__ import annotations

import msgspec

from loom.streaming import FromTopic, IntoTopic, Process, RecordStep, StreamFlow


class Order(msgspec.Struct, frozen=True):
    id: str
    amount: float


class Enriched(msgspec.Struct, frozen=True):
    id: str
    amount: float
    large: bool


def enrich(order: Order) -> Enriched:
    return Enriched(order.id, order.amount, order.amount >= 100)


def orders(count: int, start: int = 0) -> list[Order]:
    return [Order(f"o{i}", float(i)) for i in range(start, start + count)]


def enrich_flow(*steps: object) -> StreamFlow[Order, Enriched]:
    """input -> (steps or enrich) -> output, every error to dlq."""
    return StreamFlow(
        "orders",
        source=FromTopic("input", payload=Order),
        process=Process(*(steps or (RecordStep(enrich),))),  # type: ignore[arg-type]
        output=IntoTopic("output"),
        errors=IntoTopic("dlq"),
    )
