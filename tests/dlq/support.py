"""Dead letters written straight to a topic, and the ``loom dlq`` command as a process."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from loom.streaming import ErrorEnvelope, ErrorKind
from loom.streaming.bytewax.operators import dead_letter_record
from loom.streaming.codecs import MsgspecCodec

CODEC = MsgspecCodec("json", ErrorEnvelope)


def envelope(
    index: int,
    *,
    kind: ErrorKind = ErrorKind.TASK,
    node: str = "price",
    exception_type: str = "ValueError",
    source: str | None = "orders",
    attempt: int = 1,
    headers: tuple[tuple[str, bytes], ...] = (),
    occurred_at: datetime | None = None,
) -> ErrorEnvelope:
    return ErrorEnvelope(
        kind=kind,
        flow="orders",
        node=node,
        exception_type=exception_type,
        message=f"failure {index}",
        topic=source,
        partition=0 if source else None,
        offset=index if source else None,
        key=b"k-%d" % index,
        headers=(("trace", b"t-%d" % index), *headers),
        timestamp_ms=None,
        value=b'{"n": %d}' % index,
        attempt=attempt,
        occurred_at=occurred_at or datetime.now(UTC),
        traceback="flow.py:3 in price" if kind is ErrorKind.TASK else None,
    )


def write_dead_letters(bootstrap: str, topic: str, envelopes: list[ErrorEnvelope]) -> None:
    """Each envelope as the runtime writes it (JSON body, loom/Streams/Spring headers)."""
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for item in envelopes:
        key, value, headers, _ = dead_letter_record(item, CODEC)
        while True:
            try:
                producer.produce(topic, value, key, headers=list(headers or ()), partition=0)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(30) == 0


def loom_dlq(
    *args: str, bootstrap: str, cwd: Path, wait: bool = True, **popen: Any
) -> subprocess.Popen[str] | subprocess.CompletedProcess[str]:
    """``loom dlq ARGS`` as an operator runs it in the pod: brokers from LOOM_KAFKA__*."""
    env = {**os.environ, "LOOM_KAFKA__BOOTSTRAP_SERVERS": bootstrap}
    command = [sys.executable, "-m", "loom.cli", "dlq", *args]
    if not wait:
        return subprocess.Popen(
            command, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    return subprocess.run(
        command, env=env, cwd=cwd, text=True, capture_output=True, timeout=120, check=False
    )
