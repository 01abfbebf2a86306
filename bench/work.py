"""The records and the user work, identical for every peer.

Every peer decodes the same ~100-byte JSON record into :class:`Order`,
derives ``amount_with_vat``, encodes :class:`PricedOrder` as JSON and
produces it keyed by the input key. All peers use msgspec with the same
typed decoder, so the comparison measures the frameworks, not JSON
libraries (Loom's own codec is msgspec too).
"""

from __future__ import annotations

import msgspec


class Order(msgspec.Struct):
    id: str
    amount: float
    currency: str
    customer: str
    country: str
    quantity: int


class PricedOrder(msgspec.Struct):
    id: str
    amount: float
    currency: str
    customer: str
    country: str
    quantity: int
    amount_with_vat: float


def price(order: Order) -> PricedOrder:
    """The derived field: the same function in every peer."""
    return PricedOrder(
        order.id,
        order.amount,
        order.currency,
        order.customer,
        order.country,
        order.quantity,
        round(order.amount * 1.2, 2),
    )


_decode = msgspec.json.Decoder(Order).decode
_encode = msgspec.json.Encoder().encode


def process(value: bytes) -> bytes:
    """Decode, derive, encode: what the hand-written peers run per record."""
    return _encode(price(_decode(value)))


def record_id(index: int) -> str:
    return f"o{index:09d}"


_COUNTRIES = ("DE", "FR", "NL", "IT", "ES")


def order_bytes(index: int) -> bytes:
    """The ``index``-th input record (~100 bytes of JSON)."""
    return _encode(
        Order(
            id=record_id(index),
            amount=round((index % 100_000) * 0.37 + 1.0, 2),
            currency="EUR",
            customer=f"c-{index % 5000:05d}",
            country=_COUNTRIES[index % len(_COUNTRIES)],
            quantity=1 + index % 7,
        )
    )
