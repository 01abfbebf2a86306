"""Property: whatever bytes arrive, valid records come out and bad ones are dead-lettered."""

from __future__ import annotations

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loom.streaming import ErrorKind
from loom.streaming.testing import TestRunner
from tests.runtime.payloads import Order, enrich_flow

valid = st.builds(
    Order,
    id=st.text(max_size=20),
    amount=st.floats(allow_nan=False, allow_infinity=False),
).map(msgspec.json.encode)
wrong_types = st.fixed_dictionaries(
    {"id": st.integers() | st.none() | st.lists(st.integers()), "amount": st.text()}
).map(msgspec.json.encode)
invalid_json = st.text(max_size=30).map(lambda text: ("{" + text).encode())
random_bytes = st.binary(max_size=64)
tombstone = st.none()

anything = st.lists(
    st.one_of(valid, wrong_types, invalid_json, random_bytes, tombstone), max_size=40
)


def is_valid(value: bytes | None) -> bool:
    if value is None:
        return False
    try:
        msgspec.json.decode(value, type=Order)
    except msgspec.DecodeError:
        return False
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=anything)
def test_every_bad_record_is_dead_lettered_with_its_bytes_and_nothing_stops(
    values: list[bytes | None],
) -> None:
    tester = TestRunner(enrich_flow(), partitions=2)
    for index, value in enumerate(values):
        tester.send(value, key=str(index))
    result = tester.run()
    good = [v for v in values if is_valid(v)]
    bad = [v for v in values if not is_valid(v)]
    assert len(result.records("output")) == len(good)
    letters = result.dead_letters("dlq")
    assert sorted(letters_value(e.value) for e in letters) == sorted(map(letters_value, bad))
    assert {e.kind for e in letters} <= {ErrorKind.WIRE}
    for envelope in letters:
        assert envelope.topic == "input"
        assert envelope.offset is not None
        assert envelope.partition in (0, 1)
    assert sum(result.committed("input").values()) == len(values)


def letters_value(value: bytes | None) -> bytes:
    return b"<tombstone>" if value is None else value
