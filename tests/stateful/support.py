"""Paced, timestamped input for the stateful process tests, and its expected windows."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import msgspec
from confluent_kafka import Producer

from tests.kafka.support import TopicTail
from tests.stateful.window_app import WINDOW_MS, Reading, Tally


@dataclass(eq=False)
class PacedInput(threading.Thread):
    """Produces ``rate`` records a second for ``seconds``, keys round robin, in real time.

    Each record's Kafka timestamp is the wall clock when it is produced (event
    time follows real time, as in production); ``sent`` keeps (key, id,
    timestamp) of every record for the independent computation.
    """

    bootstrap: str
    topic: str
    keys: int
    rate: int
    seconds: float
    sent: list[tuple[str, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(daemon=True)

    def run(self) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5})
        started = time.monotonic()
        produced = 0
        while (elapsed := time.monotonic() - started) < self.seconds:
            for _ in range(int(elapsed * self.rate) - produced):
                key = f"k{produced % self.keys}"
                stamp = int(time.time() * 1000)
                value = msgspec.json.encode(Reading(produced))
                producer.produce(self.topic, value, key.encode(), timestamp=stamp)
                self.sent.append((key, produced, stamp))
                produced += 1
            producer.poll(0)
            time.sleep(0.005)  # the generator's pace (rate per second), not a wait for a result
        assert producer.flush(30) == 0


def expected_windows(sent: list[tuple[str, int, int]]) -> dict[tuple[str, int], tuple[int, int]]:
    """Per (key, window start): the count and the sum of ids, computed from the input."""
    counts: Counter[tuple[str, int]] = Counter()
    sums: Counter[tuple[str, int]] = Counter()
    for key, ident, stamp in sent:
        window = (key, stamp - stamp % WINDOW_MS)
        counts[window] += 1
        sums[window] += ident
    return {window: (counts[window], sums[window]) for window in counts}


def emitted(tail: TopicTail) -> list[Tally]:
    """Every result read from the output topic so far."""
    decoder = msgspec.json.Decoder(Tally)
    return [decoder.decode(record.value()) for record in tail.poll()]


def settle(tail: TopicTail) -> None:
    """Read until three polls in a row bring nothing new (everything written is read)."""
    quiet = 0
    while quiet < 3:
        before = len(tail.records)
        quiet = quiet + 1 if len(tail.poll()) == before else 0
