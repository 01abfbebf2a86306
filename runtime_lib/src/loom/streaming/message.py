"""The record model steps see: a payload plus where it came from."""

from __future__ import annotations

from typing import Generic, TypeVar

import msgspec

T = TypeVar("T")

Headers = tuple[tuple[str, bytes], ...]


class MessageMeta(msgspec.Struct, frozen=True):
    """Source coordinates of an input record, as read from the broker.

    ``headers`` keep their order and may repeat a name, as Kafka allows.
    """

    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    headers: Headers = ()
    timestamp_ms: int | None = None


class Message(msgspec.Struct, Generic[T], frozen=True):
    """A payload with its key and headers.

    A step whose first parameter is annotated ``Message[...]`` receives the
    whole message instead of the bare payload (to read the key, headers or
    source coordinates). A step may also *return* a ``Message`` to choose the
    output key and headers; a bare return value keeps the input's key and
    headers.
    """

    payload: T
    key: bytes | None = None
    headers: Headers = ()
    meta: MessageMeta | None = None
