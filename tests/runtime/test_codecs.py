"""Every codec's decoder reports undecodable bytes as one exception type, DecodeError."""

from __future__ import annotations

from typing import Any

import msgspec
import pydantic
import pytest

from loom.errors import DecodeError
from loom.streaming import FromTopic, IntoTopic, Process, RecordStep, StreamFlow
from loom.streaming.codecs import build_codec
from loom.streaming.testing import TestRunner


class StructOrder(msgspec.Struct):
    id: str
    amount: float


class ModelOrder(pydantic.BaseModel):
    id: str
    amount: float


MALFORMED = b"{not json"
WRONG_SHAPE = b'{"id": 1, "amount": "x"}'


def keep_struct(order: StructOrder) -> StructOrder:
    return order


def keep_model(order: ModelOrder) -> ModelOrder:
    return order


STEPS: dict[type, Any] = {StructOrder: keep_struct, ModelOrder: keep_model}


def wire_exception_type(payload: type, value: bytes) -> str:
    """The ``exception_type`` of the dead letter a flow reading ``payload`` writes for ``value``."""
    flow: StreamFlow[Any, Any] = StreamFlow(
        "orders",
        source=FromTopic("input", payload=payload),
        process=Process(RecordStep(STEPS[payload])),
        output=IntoTopic("output"),
        errors=IntoTopic("dlq"),
    )
    tester = TestRunner(flow)
    tester.send(value)
    [envelope] = tester.run().dead_letters("dlq")
    return envelope.exception_type


@pytest.mark.parametrize("value", [MALFORMED, WRONG_SHAPE], ids=["malformed-json", "wrong-shape"])
def test_a_bad_record_has_the_same_exception_type_for_msgspec_and_pydantic_payloads(
    value: bytes,
) -> None:
    types = {
        library: wire_exception_type(payload, value)
        for library, payload in [("msgspec", StructOrder), ("pydantic", ModelOrder)]
    }
    assert types == {"msgspec": "DecodeError", "pydantic": "DecodeError"}


@pytest.mark.parametrize(
    ("fmt", "payload", "value", "library_message"),
    [
        ("json", StructOrder, MALFORMED, "malformed"),
        ("json", StructOrder, WRONG_SHAPE, "Expected `str`"),
        ("msgpack", StructOrder, b"\xc1", "invalid"),
        ("msgpack", StructOrder, msgspec.msgpack.encode({"id": 1}), "Expected `str`"),
        ("json", ModelOrder, MALFORMED, "Invalid JSON"),
        ("json", ModelOrder, WRONG_SHAPE, "string_type"),
    ],
)
def test_every_codec_reports_a_failed_decode_as_decode_error_with_the_library_message(
    fmt: Any, payload: type, value: bytes, library_message: str
) -> None:
    codec = build_codec(fmt, payload)
    with pytest.raises(Exception) as failed:  # noqa: PT011 - the library's own error
        codec.decoder(value)
    error = codec.wire_error(failed.value)
    assert isinstance(error, DecodeError)
    assert library_message in str(error)
    assert error.__cause__ is failed.value


@pytest.mark.parametrize("payload", [StructOrder, ModelOrder])
def test_a_codec_decoder_returns_the_payload_for_valid_bytes(payload: type) -> None:
    order = build_codec("json", payload).decoder(b'{"id": "o1", "amount": 2.5}')
    assert (type(order), order.id, order.amount) == (payload, "o1", 2.5)


def test_the_raw_codec_decoder_returns_the_bytes_as_they_are() -> None:
    assert build_codec("raw", None).decoder(b"\xff\x00") == b"\xff\x00"
