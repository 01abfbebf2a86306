"""Declarations of a streaming flow.

Everything here is a plain, immutable description: constructing a node does no
I/O and runs no user code. :func:`loom.streaming.compile_flow` validates a
whole :class:`StreamFlow` and turns it into an executable plan.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeAlias, TypeVar

from loom.streaming.errors import ErrorKind

InT = TypeVar("InT")
OutT = TypeVar("OutT")
T = TypeVar("T")

CodecName: TypeAlias = Literal["json", "msgpack", "raw"]


def display_name(obj: Any) -> str:
    """A function's name for ids and diagrams (``lambda`` for lambdas)."""
    name = getattr(obj, "__name__", None)
    if name == "<lambda>":
        return "lambda"
    return name if isinstance(name, str) else type(obj).__name__


@dataclass(frozen=True)
class FromTopic(Generic[T]):
    """Consume a topic, decoding each value into ``payload``.

    ``topic`` is a *logical* name bound to a physical topic by the config
    (``topics.<name>`` / ``LOOM_TOPICS__<NAME>``), so one flow runs unchanged
    in every environment. Values that fail to decode or validate become
    ``WIRE`` errors carrying the original bytes.
    """

    topic: str
    payload: type[T] | None = None
    codec: CodecName = "json"


@dataclass(frozen=True)
class IntoTopic(Generic[T]):
    """Produce records to a topic; a terminal node.

    With ``payload`` set, a record of another type is a ``TASK`` error instead
    of being written, so a step that forgets to transform its input cannot
    leak input-shaped records downstream.
    """

    topic: str
    payload: type[T] | None = None
    codec: CodecName = "json"


@dataclass(frozen=True)
class IntoSink:
    """Write records to a sink registered with ``StreamingRunner.register_sink``.

    ``sink`` names an entry under ``streaming.sinks`` in the config, which
    gives the registered sink type and its options.
    """

    sink: str


@dataclass(frozen=True)
class Drain:
    """Deliberately discard records; they count as finished for commits."""

    name: str | None = None


@dataclass(frozen=True)
class Retry:
    """Run a failing step again: up to ``attempts`` calls in all, waiting between them.

    ``attempts=1`` is one call, no retry (the step runs as without ``retry``).

    The wait before the second call is ``backoff_ms``, and it doubles for each
    call after that, capped at ``max_backoff_ms`` (``None``: no cap); no
    jitter, so the waits are the same in every run. ``on`` lists the
    exception classes worth another call; empty (the default) means any
    ``Exception``, an async step's ``AsyncTimeout`` (``TIMEOUT``) included.
    A ``BusinessError`` is a verdict on the record, not a glitch: it is
    retried only when ``on`` lists ``BusinessError`` or a subclass it is an
    instance of. After the last call the record is dead-lettered as today,
    its ``attempt`` counting every call made. ``compile_flow`` checks the
    values (``attempts >= 1``, ``0 <= backoff_ms <= max_backoff_ms``, ``on``
    a tuple of exception classes).
    """

    attempts: int
    backoff_ms: int
    max_backoff_ms: int | None = None
    on: tuple[type[Exception], ...] = ()


@dataclass(frozen=True)
class RecordStep:
    """Apply ``fn`` to each record: ``T -> U``; returning ``None`` drops it.

    With ``retry``, a record whose call failed waits for its backoff off the
    chunk (the others go on at once) and is run again on a later chunk or
    tick: it leaves behind records read after it (see :class:`Retry`).
    """

    fn: Callable[..., Any]
    name: str | None = None
    retry: Retry | None = None


@dataclass(frozen=True)
class ExpandStep:
    """Apply ``fn`` to each record: ``T -> Iterable[U]`` (zero or more outputs).

    ``retry`` as for :class:`RecordStep`.
    """

    fn: Callable[..., Iterable[Any]]
    name: str | None = None
    retry: Retry | None = None


@dataclass(frozen=True)
class CollectBatch:
    """Group records into lists of up to ``max_records``.

    A batch is emitted when it is full or ``timeout_ms`` after its first
    record arrived, whichever comes first, also when the stream goes idle.
    Must be followed by a :class:`BatchStep` or a :class:`WithAsync`.
    """

    max_records: int
    timeout_ms: int
    name: str | None = None


@dataclass(frozen=True)
class BatchStep:
    """Apply ``fn`` to a batch from :class:`CollectBatch`: ``list[T] -> Iterable[U]``.

    ``retry`` as for :class:`RecordStep`: the whole batch is called again.
    """

    fn: Callable[..., Iterable[Any]]
    name: str | None = None
    retry: Retry | None = None


@dataclass(frozen=True)
class WithAsync:
    """Run an ``async def`` step with up to ``max_concurrency`` records in flight.

    ``fn`` is an async function (used like a :class:`RecordStep`) or a
    ``RecordStep``/``ExpandStep``/``BatchStep`` wrapping one. A call that takes
    longer than ``timeout_ms`` becomes a ``TIMEOUT`` error.

    ``max_concurrency`` is per Bytewax worker and spans polls: the next record
    starts as soon as any call finishes. Results leave in input order, so
    per-partition order is preserved (a slow call holds back the ones after
    it, never more than the window).

    With ``retry`` (here, or on the step it wraps, not both) a failed call
    waits for its backoff (``anyio.sleep``) in its own task and runs again;
    a ``TIMEOUT`` counts as a failure. A waiting retry keeps its concurrency
    slot, so ``max_concurrency`` still bounds the load on the dependency
    being retried; other records keep using the other slots, and results
    still leave in input order.
    """

    fn: Callable[..., Any] | RecordStep | ExpandStep | BatchStep
    max_concurrency: int = 100
    timeout_ms: int | None = None
    name: str | None = None
    retry: Retry | None = None


@dataclass(frozen=True)
class StatefulStep:
    """Keep state per key: ``fn(state | None, value) -> (new_state | None, output)``.

    ``state`` is what ``fn`` returned last time for the record's key (``None``
    the first time, or after ``fn`` returned ``None`` as the state, which
    deletes it). ``output`` is a value, ``None`` (nothing) or an iterable of
    values; outputs keep the input's key and headers.

    ``key`` (a function of the payload) defaults to the Kafka record key.
    State is partitioned by the input partition: records of one key must come
    from one partition, which holds for the record key and for any key
    function that refines it (see ``docs/stateful.md``). ``ttl_ms`` deletes a
    key's state once event time (the record timestamps, advancing with the
    wall clock while the input is idle) is that far past its last update.

    State is durable: snapshotted to ``LOOM_STATE__DIR``, and an offset is
    committed only once the state it changed is in a snapshot, so a restart
    after a crash applies every record exactly once.
    """

    fn: Callable[[Any, Any], tuple[Any, Any]]
    key: Callable[[Any], Any] | None = None
    ttl_ms: int | None = None
    name: str | None = None


@dataclass(frozen=True)
class WindowAggregate:
    """Aggregate records per key and event-time window; one result per (key, window).

    ``window`` is :class:`~loom.streaming.windows.Tumbling`, ``Hopping`` or
    ``Session``; ``aggregate`` folds records (``initial``, ``add``, ``result``,
    and ``merge`` for sessions; built-ins ``Count``, ``Sum``, ``Min``,
    ``Max``, ``Mean``, ``Collect``). ``key`` (a function of the payload)
    defaults to the Kafka record key, ``event_time`` (a function of the
    payload returning epoch milliseconds) to the record timestamp.

    A window's result is emitted once event time passes its end plus
    ``grace_ms``. Event time is the largest record time seen on the input
    partition, and advances with the wall clock while the partition is idle
    (read to its end), so a quiet partition never holds windows open. A
    record whose window has already closed is a ``LATE`` error: it is
    dead-lettered with its original bytes, never dropped.

    Exact after crashes: offsets are committed only once the windows holding
    their records are in a snapshot and every result emitted before it is
    delivered, so a restart re-emits at most whole results, never a partial
    one.
    """

    window: Any
    aggregate: Any
    key: Callable[[Any], Any] | None = None
    event_time: Callable[[Any], int] | None = None
    grace_ms: int = 0
    name: str | None = None


Terminal: TypeAlias = IntoTopic[Any] | IntoSink | Drain


@dataclass(frozen=True)
class Route:
    """One branch of a :class:`Router`: records for which ``when`` is true go ``to``."""

    when: Callable[[Any], bool]
    to: Terminal | Process


class Router:
    """Send each record down the first route whose predicate matches.

    A record matching no route goes to ``default``; without a default it is a
    ``ROUTING`` error, never passed through. A router ends its process: every
    branch ends in its own terminal.
    """

    __slots__ = ("default", "name", "routes")

    def __init__(
        self,
        *routes: Route,
        default: Terminal | Process | None = None,
        name: str | None = None,
    ) -> None:
        self.routes = routes
        self.default = default
        self.name = name

    def __repr__(self) -> str:
        return f"Router({len(self.routes)} routes, default={self.default!r})"


Node: TypeAlias = (
    RecordStep
    | ExpandStep
    | CollectBatch
    | BatchStep
    | WithAsync
    | StatefulStep
    | WindowAggregate
    | Router
    | Terminal
)


class Process:
    """An ordered chain of nodes; only the last may be a terminal or a router."""

    __slots__ = ("nodes",)

    def __init__(self, *nodes: Node) -> None:
        self.nodes = nodes

    def __repr__(self) -> str:
        return f"Process({', '.join(type(node).__name__ for node in self.nodes)})"


ErrorRoutes: TypeAlias = Terminal | Mapping[ErrorKind | tuple[ErrorKind, ...], Terminal]


@dataclass(frozen=True, init=False)
class StreamFlow(Generic[InT, OutT]):
    """A complete flow: one source, a process, and where results and errors go.

    ``output`` is appended as the terminal of ``process`` when given.
    ``errors`` is one terminal for every error kind, or a mapping from a kind
    (or a tuple of kinds) to a terminal. Every kind must have a route: use
    ``Drain()`` to discard a kind on purpose.
    """

    name: str
    source: FromTopic[InT]
    process: Process
    output: IntoTopic[OutT] | None
    errors: ErrorRoutes | None = field(default=None)

    def __init__(
        self,
        name: str,
        *,
        source: FromTopic[InT],
        process: Process,
        output: IntoTopic[OutT] | None = None,
        errors: ErrorRoutes | None = None,
    ) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "process", process)
        object.__setattr__(self, "output", output)
        object.__setattr__(self, "errors", errors)
