"""Chunk-level operators: one callable per plan node, run inside ``op.map``.

Each operator loops over a chunk's records in plain Python (the per-record
hot path), turns exceptions into failures, and releases acks of records that
end here (filtered, zero outputs). Operators that buffer keep their state per
Bytewax worker, keyed by ``chunk.worker``; a worker's chunks always arrive on
its own thread.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import Counter

from loom.delivery.acks import Ack, GroupAck
from loom.delivery.transport import OutRecord
from loom.observability.logs import DeadLetterLog
from loom.observability.metrics import DropReason, FlowMetrics
from loom.observability.tracing import Outcome, RecordSpan, with_trace_headers
from loom.streaming.bytewax.records import (
    PAYLOAD_TYPES,
    Chunk,
    Failure,
    Outbound,
    Rec,
    error_kind_of,
    failures_for,
)
from loom.streaming.codecs import Codec
from loom.streaming.errors import ErrorEnvelope, ErrorKind
from loom.streaming.plan import CollectPlan, RouterPlan, StepPlan, TopicBinding

ChunkOp = Callable[[Chunk], Chunk]


def _merge(chunk: Chunk, new: list[Failure]) -> list[Failure]:
    return [*chunk.failures, *new] if new else chunk.failures


def step_argument(rec: Rec, takes_message: bool) -> Any:
    if rec.members is not None:
        return [m.as_message() for m in rec.members] if takes_message else rec.value
    return rec.as_message() if takes_message else rec.value


def note_dropped(rec: Rec, node: str, reason: str) -> None:
    """Note on ``rec``'s span (a batch: its members' spans) that it ends here.

    Called before the record's ack is released, only for chunks that are
    ``traced``: the span ends with the release.
    """
    if rec.members is not None:
        for member in rec.members:
            if member.span is not None:
                member.span.drop(node, reason)
    elif rec.span is not None:
        rec.span.drop(node, reason)


def note_reached(records: list[Rec], outcome: Outcome, node: str | None = None) -> None:
    """Note on the spans of ``records`` (of a ``traced`` chunk) the terminal they reached."""
    for rec in records:
        if rec.span is not None:
            rec.span.reach(outcome, node)


class _StepOp:
    """A user function applied by an operator, with what failures need to name.

    ``dropped`` counts records the step ends without output, once per chunk
    (a batch counts its members, inline: a call per record costs ~50 ns).
    """

    reason = DropReason.FILTERED

    def __init__(self, flow: str, plan: StepPlan, metrics: FlowMetrics | None = None) -> None:
        self.flow = flow
        self.node = plan.node_id
        self.fn = plan.fn
        self.takes_message = plan.takes_message
        self.dropped: Counter | None = None
        if metrics is not None:
            self.dropped = metrics.dropped.labels(flow, self.node, self.reason)


class RecordOp(_StepOp):
    """``RecordStep``: one result per record; ``None`` drops the record."""

    def __call__(self, chunk: Chunk) -> Chunk:
        if not chunk.records:
            return chunk
        fn, takes_message, traced = self.fn, self.takes_message, chunk.traced
        out: list[Rec] = []
        failed: list[Failure] = []
        dropped = 0
        for rec in chunk.records:
            try:
                result = fn(rec.as_message() if takes_message else rec.value)
            except Exception as exc:
                failed += failures_for(self.flow, self.node, error_kind_of(exc), rec, exc)
                continue
            if result is None:
                if traced:
                    note_dropped(rec, self.node, self.reason)
                rec.ack.release()
                dropped += 1 if rec.members is None else len(rec.members)
                continue
            if type(result) in PAYLOAD_TYPES:
                rec.value = result  # the common case, without a method call
            else:
                rec.set_result(result)
            out.append(rec)
        if dropped and self.dropped is not None:
            self.dropped.inc(dropped)
        return chunk.derive(out, _merge(chunk, failed))


def fan_out(rec: Rec, results: list[Any], ack: Ack, out: list[Rec]) -> None:
    """Emit ``results`` as records derived from ``rec`` holding ``ack``.

    The children share ``rec``'s span (and ack): an expanded record is one
    span, ended when its last child is finished; children of a batch have none.
    """
    if not results:
        ack.release()
        return
    ack.retain(len(results) - 1)
    for value in results:
        origin = rec.origin if rec.members is None else None
        child = Rec(None, origin, ack, None, rec.key, rec.headers, rec.span)
        child.set_result(value)
        out.append(child)


class ExpandOp(_StepOp):
    """``ExpandStep``/``BatchStep``: zero or more results per record or batch.

    Results are materialised before any is emitted, so a step that raises
    halfway sends the whole input to the error route and no partial output.
    """

    reason = DropReason.EMPTY

    def __call__(self, chunk: Chunk) -> Chunk:
        if not chunk.records:
            return chunk
        out: list[Rec] = []
        failed: list[Failure] = []
        dropped = 0
        traced = chunk.traced
        for rec in chunk.records:
            try:
                results = materialise(self.fn(step_argument(rec, self.takes_message)))
            except Exception as exc:
                failed += failures_for(self.flow, self.node, error_kind_of(exc), rec, exc)
                continue
            if not results:
                dropped += 1 if rec.members is None else len(rec.members)
                if traced:
                    note_dropped(rec, self.node, self.reason)
            fan_out(rec, results, rec.ack, out)
        if dropped and self.dropped is not None:
            self.dropped.inc(dropped)
        return chunk.derive(out, _merge(chunk, failed))


def emit_result(
    rec: Rec, result: Any, out: list[Rec], *, record: bool, node: str, traced: bool
) -> int:
    """Pass on one successful call's result; return how many input records it dropped.

    ``record``: a record step's result (``None`` drops the record); otherwise
    the materialised results of an expand or batch step (none drops it).
    ``traced``: the record may have a span, to be told why it ends here. For
    the operators that handle one call at a time (async steps, retried
    steps); ``RecordOp`` and ``ExpandOp`` inline the same on their hot loops.
    """
    if record:
        if result is None:
            if traced:
                note_dropped(rec, node, DropReason.FILTERED)
            rec.ack.release()
            return 1 if rec.members is None else len(rec.members)
        rec.set_result(result)
        out.append(rec)
        return 0
    if not result and traced:
        note_dropped(rec, node, DropReason.EMPTY)
    fan_out(rec, result, rec.ack, out)
    if result:
        return 0
    return 1 if rec.members is None else len(rec.members)


def materialise(results: Iterable[Any] | None) -> list[Any]:
    if results is None:
        return []
    if isinstance(results, str | bytes | dict):
        raise TypeError(
            f"an expand or batch step must return an iterable of records, "
            f"not {type(results).__name__}"
        )
    return list(results)


def make_batch(members: list[Rec]) -> Rec:
    return Rec(
        [member.value for member in members],
        None,
        GroupAck([member.ack for member in members]),
        members,
    )


class _Buffer:
    __slots__ = ("deadline", "records", "traced")

    def __init__(self) -> None:
        self.records: list[Rec] = []
        self.deadline = 0.0
        self.traced = False
        """Some buffered record may have a span (buffers outlive chunks)."""


class CollectOp:
    """``CollectBatch``: emit batches when full, when their timeout passes, or on flush.

    A member's span ends when its batch is finished (the batch's ``GroupAck``
    holds the member's ack); until a later terminal says otherwise, its
    outcome is ``batched``.
    """

    def __init__(self, plan: CollectPlan) -> None:
        self.node = plan.node_id
        self.max_records = plan.max_records
        self.timeout_s = plan.timeout_ms / 1000
        self._buffers: dict[int, _Buffer] = {}

    def __call__(self, chunk: Chunk) -> Chunk:
        buffer = self._buffers.get(chunk.worker)
        if buffer is None:
            buffer = self._buffers[chunk.worker] = _Buffer()
        if chunk.traced:
            buffer.traced = True
            note_reached(chunk.records, Outcome.BATCHED, self.node)
        traced = buffer.traced
        now = time.monotonic()
        out: list[Rec] = []
        for rec in chunk.records:
            if not buffer.records:
                buffer.deadline = now + self.timeout_s
            buffer.records.append(rec)
            if len(buffer.records) >= self.max_records:
                out.append(make_batch(buffer.records))
                buffer.records = []
        if buffer.records and (chunk.flush or now >= buffer.deadline):
            out.append(make_batch(buffer.records))
            buffer.records = []
        if not buffer.records:
            buffer.traced = False
        if traced == chunk.traced:
            return chunk.derive(out, chunk.failures)
        return Chunk(chunk.worker, out, chunk.failures, chunk.flush, traced)


class RouterOp:
    """``Router``: split a chunk into one chunk per route (plus the default).

    Every output chunk carries the control signals (ticks, flush) so each
    branch makes progress; upstream failures travel in the first one only.
    """

    def __init__(self, flow: str, plan: RouterPlan) -> None:
        self.flow = flow
        self.node = plan.node_id
        self.predicates = [route.predicate for route in plan.routes]
        self.has_default = plan.default is not None

    @property
    def outputs(self) -> int:
        return len(self.predicates) + self.has_default

    def __call__(self, chunk: Chunk) -> tuple[Chunk, ...]:
        buckets: list[list[Rec]] = [[] for _ in range(self.outputs)]
        failed: list[Failure] = []
        for rec in chunk.records:
            try:
                index = self._route(rec.value)
            except Exception as exc:
                failed += failures_for(self.flow, self.node, error_kind_of(exc), rec, exc)
                continue
            if index is None:
                reason = f"no route of {self.node} matched and it has no default"
                failed += failures_for(self.flow, self.node, ErrorKind.ROUTING, rec, reason)
            else:
                buckets[index].append(rec)
        first = _merge(chunk, failed)
        return tuple(
            chunk.derive(records, first if index == 0 else [])
            for index, records in enumerate(buckets)
        )

    def _route(self, value: Any) -> int | None:
        for index, predicate in enumerate(self.predicates):
            if predicate(value):
                return index
        return len(self.predicates) if self.has_default else None


class EncodeOp:
    """Before ``IntoTopic``: encode records to bytes, checking the declared type."""

    def __init__(self, flow: str, node: str, binding: TopicBinding) -> None:
        self.flow = flow
        self.node = node
        self.codec: Codec = binding.codec
        expected = binding.payload_type
        self.expected: type | None = expected if isinstance(expected, type) else None

    def __call__(self, chunk: Chunk) -> Outbound:
        encode, expected, traced = self.codec.encoder, self.expected, chunk.traced
        items: list[OutRecord] = []
        acks: list[Ack] = []
        failed: list[Failure] = []
        for rec in chunk.records:
            value = rec.value
            try:
                if expected is not None and not isinstance(value, expected):
                    raise TypeError(
                        f"{self.node} expects {expected.__name__} records, got "
                        f"{type(value).__name__}"
                    )
                data = encode(value)
            except Exception as exc:
                failed += failures_for(self.flow, self.node, ErrorKind.TASK, rec, exc)
                continue
            origin = rec.origin
            headers: Sequence[tuple[str, bytes]] | None
            if rec.key is None and rec.headers is None and origin is not None:
                key, headers = origin.key(), origin.headers()  # the common case
            else:
                key, headers = rec.out_key(), rec.out_headers()
            if traced and rec.span is not None:
                # Ends with the ack: once the broker confirms the record.
                headers = with_trace_headers(rec.span.span, headers or ())
                rec.span.reach(Outcome.DELIVERED, self.node)
            if origin is not None:
                # Only the origin is needed from here on (a refused record's error
                # envelope is built from it): free the value now, while it is hot
                # in the CPU cache, not when the delivery window is confirmed.
                rec.value = None
            items.append((key, data, headers, rec))
            acks.append(rec.ack)
        return Outbound(items, acks, _merge(chunk, failed))


def to_messages(chunk: Chunk) -> Outbound:
    """Before ``IntoSink``: hand records to the user's sink as ``Message`` objects.

    A traced record's span ends once the sink's ``write_batch`` returns (the
    sink releases the ack).
    """
    if chunk.traced:
        note_reached(chunk.records, Outcome.WRITTEN)
    return Outbound(
        [rec.as_message() for rec in chunk.records],
        [rec.ack for rec in chunk.records],
        chunk.failures,
    )


class DrainOp:
    """``Drain``: records end here on purpose; they count as finished (and dropped)."""

    def __init__(self, counter: Counter | None = None, node: str = "drain") -> None:
        self.counter = counter
        self.node = node

    def __call__(self, chunk: Chunk) -> Outbound:
        dropped = 0
        traced = chunk.traced
        for rec in chunk.records:
            if traced:
                note_dropped(rec, self.node, DropReason.DRAINED)
            rec.ack.release()
            dropped += 1 if rec.members is None else len(rec.members)
        if dropped and self.counter is not None:
            self.counter.inc(dropped)
        return Outbound([], [], chunk.failures)


drain = DrainOp()
"""A ``Drain`` that counts nothing."""


class SelectErrors:
    """Pick the failures of some kinds for one error terminal; count and log them.

    Each failure is chosen by exactly one error terminal, so counting and
    logging here sees every dead letter once. ``labels`` are the counter's
    ``(flow, topic)``; kind and failing node are added per failure.
    """

    def __init__(
        self,
        kinds: Iterable[ErrorKind],
        counter: Counter | None = None,
        labels: tuple[str, str] = ("", ""),
        log: DeadLetterLog | None = None,
    ) -> None:
        self.kinds = frozenset(kinds)
        self.counter = counter
        self.labels = labels
        self.log = log

    def __call__(self, failures: list[Failure]) -> list[Failure] | None:
        chosen = [failure for failure in failures if failure.envelope.kind in self.kinds]
        if not chosen:
            return None
        if self.counter is not None:
            counts = collections.Counter((f.envelope.kind, f.envelope.node) for f in chosen)
            for (kind, node), count in counts.items():
                self.counter.labels(*self.labels, kind.value, node).inc(count)
        if self.log is not None:
            self.log.record(chosen, self.labels[1])
        return chosen


def envelopes(failures: list[Failure]) -> Outbound:
    return Outbound([f.envelope for f in failures], [f.ack for f in failures], [])


def drain_errors(failures: list[Failure]) -> Outbound:
    for failure in failures:
        failure.ack.release()
    return Outbound([], [], [])


DLQ_HEADER_PREFIX = "loom-"


class DeadLetterEncoder:
    """Error envelopes as dead-letter records: JSON body, coordinates in headers too."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec

    def __call__(self, failures: list[Failure]) -> Outbound:
        items = [dead_letter_record(f.envelope, self.codec, f.ack) for f in failures]
        return Outbound(items, [f.ack for f in failures], [])


def dead_letter_record(envelope: ErrorEnvelope, codec: Codec, ack: Ack | None = None) -> OutRecord:
    """The dead-letter record of ``envelope``.

    A traced record's ack is its span (:class:`RecordSpan`): the dead letter
    then carries that span's ``traceparent``, not the upstream one, so the
    trace goes input -> ``process`` span (status ERROR) -> dead letter.
    """
    headers = [h for h in envelope.headers if not h[0].startswith(_OWN_HEADER_PREFIXES)]
    headers += [
        (f"{DLQ_HEADER_PREFIX}error-kind", envelope.kind.value.encode()),
        (f"{DLQ_HEADER_PREFIX}flow", envelope.flow.encode()),
        (f"{DLQ_HEADER_PREFIX}node", envelope.node.encode()),
        (f"{DLQ_HEADER_PREFIX}exception-type", envelope.exception_type.encode()),
        (f"{DLQ_HEADER_PREFIX}attempt", str(envelope.attempt).encode()),
    ]
    if envelope.topic is not None:
        headers += [
            (f"{DLQ_HEADER_PREFIX}source-topic", envelope.topic.encode()),
            (f"{DLQ_HEADER_PREFIX}source-partition", str(envelope.partition).encode()),
            (f"{DLQ_HEADER_PREFIX}source-offset", str(envelope.offset).encode()),
        ]
    headers += interop_headers(envelope)
    if isinstance(ack, RecordSpan):
        return (envelope.key, codec.encode(envelope), with_trace_headers(ack.span, headers), None)
    return (envelope.key, codec.encode(envelope), headers, None)


STREAMS_HEADER_PREFIX = "__streams.errors."
"""Kafka Streams' dead-letter headers (KIP-1034): values are UTF-8 strings."""
SPRING_HEADER_PREFIX = "kafka_dlt-"
"""Spring Kafka's ``DeadLetterPublishingRecoverer`` headers (``KafkaHeaders.DLT_*``)."""
_OWN_HEADER_PREFIXES = (DLQ_HEADER_PREFIX, STREAMS_HEADER_PREFIX, SPRING_HEADER_PREFIX)
"""Input headers a dead letter does not pass on: it writes its own (a replayed
dead letter of another tool must not carry two exception headers)."""


def interop_headers(envelope: ErrorEnvelope) -> list[tuple[str, bytes]]:
    """The exception and source coordinates under Kafka Streams' and Spring's names.

    Built once per dead letter (never per output record). Streams writes every
    value as a UTF-8 string; Spring writes partition and offset as 4- and
    8-byte big-endian integers, the rest as UTF-8. ``exception_type`` is the
    Python class's qualified name; the stack trace is the envelope's
    ``traceback`` (empty for kinds that have none). Source coordinates are
    left out when the record had no source (a derived record).
    """
    exception = envelope.exception_type.encode()
    message = envelope.message.encode()
    stack = (envelope.traceback or "").encode()
    headers = [
        (f"{STREAMS_HEADER_PREFIX}exception", exception),
        (f"{STREAMS_HEADER_PREFIX}message", message),
        (f"{STREAMS_HEADER_PREFIX}stacktrace", stack),
        (f"{SPRING_HEADER_PREFIX}exception-fqcn", exception),
        (f"{SPRING_HEADER_PREFIX}exception-message", message),
        (f"{SPRING_HEADER_PREFIX}exception-stacktrace", stack),
    ]
    if envelope.topic is not None and envelope.partition is not None:
        topic = envelope.topic.encode()
        offset = envelope.offset if envelope.offset is not None else -1
        # Java's ByteBuffer.putInt / putLong: big-endian, two's complement.
        headers += [
            (f"{STREAMS_HEADER_PREFIX}topic", topic),
            (f"{STREAMS_HEADER_PREFIX}partition", str(envelope.partition).encode()),
            (f"{STREAMS_HEADER_PREFIX}offset", str(offset).encode()),
            (f"{SPRING_HEADER_PREFIX}original-topic", topic),
            (f"{SPRING_HEADER_PREFIX}original-partition", envelope.partition.to_bytes(4, "big")),
            (f"{SPRING_HEADER_PREFIX}original-offset", offset.to_bytes(8, "big", signed=True)),
        ]
    return headers
