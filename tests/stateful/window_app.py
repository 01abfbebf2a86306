"""A windowed service like a generated one, run as a subprocess by the crash tests.

Per record key and 1-second tumbling window (Kafka timestamps), it counts the
records and sums their ids: a record counted twice or lost changes both, so
every result can be checked against the input.
"""

from __future__ import annotations

import msgspec

from loom.service import serve
from loom.streaming import FromTopic, IntoTopic, Process, StreamFlow, Tumbling, WindowAggregate
from loom.streaming.windows import Window

WINDOW_MS = 1000
GRACE_MS = 1000


class Reading(msgspec.Struct, frozen=True):
    id: int


class Tally(msgspec.Struct, frozen=True):
    key: str
    start_ms: int
    count: int
    id_sum: int


class CountAndIdSum:
    def initial(self) -> tuple[int, int]:
        return (0, 0)

    def add(self, acc: tuple[int, int], value: Reading) -> tuple[int, int]:
        return (acc[0] + 1, acc[1] + value.id)

    def result(self, key: bytes, window: Window, acc: tuple[int, int]) -> Tally:
        return Tally(key.decode(), window.start_ms, acc[0], acc[1])


flow = StreamFlow(
    "window-app",
    source=FromTopic("input", payload=Reading),
    process=Process(WindowAggregate(Tumbling(WINDOW_MS), CountAndIdSum(), grace_ms=GRACE_MS)),
    output=IntoTopic("output", payload=Tally),
    errors=IntoTopic("dlq"),
)

if __name__ == "__main__":
    serve(flow, default_group_id="window-app")
