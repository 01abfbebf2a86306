"""The compiled, validated form of a flow that the Bytewax adapter executes.

A plan is a tree: a :class:`BranchPlan` is a chain of steps ending in a
terminal or a router, and each router route holds another branch. Every node
has a unique ``node_id`` that is also a valid Bytewax step id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from loom.streaming.codecs import Codec
from loom.streaming.errors import BusinessError, ErrorKind
from loom.streaming.windows import WindowSpec


@dataclass(frozen=True)
class TopicBinding:
    """A logical topic of the flow bound to a physical topic and a codec."""

    logical: str
    physical: str
    codec: Codec
    payload_type: Any


@dataclass(frozen=True)
class SourcePlan:
    node_id: str
    binding: TopicBinding


StepKind = Literal["record", "expand", "batch"]

STATE_TICK_MS = 20
"""Idle wake-ups of a flow with state: event time follows the wall clock at
this resolution while the input is idle."""

_MAX_DOUBLINGS = 40
"""Doublings of an uncapped backoff (a wait of ``backoff_ms * 2**40``, years)."""


@dataclass(frozen=True)
class RetryPlan:
    """A validated ``Retry``: how many calls, the waits between them, what is retried.

    ``on`` are the listed classes (empty: any ``Exception``); ``business``
    those of them that are ``BusinessError``s, the only ones a
    ``BusinessError`` is retried for.
    """

    attempts: int
    backoff_ms: int
    max_backoff_ms: int | None
    on: tuple[type[Exception], ...]
    business: tuple[type[Exception], ...]

    def retryable(self, error: BaseException) -> bool:
        """Whether a call that raised ``error`` may be made again (attempts aside)."""
        if isinstance(error, BusinessError):
            return isinstance(error, self.business)
        return isinstance(error, self.on) if self.on else True

    def delay_s(self, made: int) -> float:
        """Seconds to wait after the ``made``-th failed call before the next one."""
        delay = self.backoff_ms * 2.0 ** min(made - 1, _MAX_DOUBLINGS)
        if self.max_backoff_ms is not None:
            delay = min(delay, self.max_backoff_ms)
        return delay / 1000


@dataclass(frozen=True)
class StepPlan:
    """A synchronous user function applied per record (or per batch)."""

    node_id: str
    kind: StepKind
    fn: Callable[..., Any]
    takes_message: bool
    retry: RetryPlan | None = None


@dataclass(frozen=True)
class CollectPlan:
    node_id: str
    max_records: int
    timeout_ms: int


@dataclass(frozen=True)
class AsyncPlan:
    """An async user function run on the AsyncBridge with bounded concurrency."""

    node_id: str
    kind: StepKind
    fn: Callable[..., Any]
    takes_message: bool
    max_concurrency: int
    timeout_ms: int | None
    retry: RetryPlan | None = None


@dataclass(frozen=True)
class TopicSinkPlan:
    node_id: str
    binding: TopicBinding


@dataclass(frozen=True)
class NamedSinkPlan:
    """A sink resolved at run time from ``streaming.sinks.<name>``."""

    node_id: str
    name: str
    sink_type: str
    options: dict[str, Any]


@dataclass(frozen=True)
class DrainPlan:
    node_id: str


@dataclass(frozen=True)
class StatefulPlan:
    """A ``StatefulStep``: ``fn(state, value) -> (state, output)`` per key."""

    node_id: str
    fn: Callable[[Any, Any], tuple[Any, Any]]
    key: Callable[[Any], Any] | None
    ttl_ms: int | None


@dataclass(frozen=True)
class WindowPlan:
    """A ``WindowAggregate``: validated window, aggregate, key and event time."""

    node_id: str
    window: WindowSpec
    aggregate: Any
    key: Callable[[Any], Any] | None
    event_time: Callable[[Any], int] | None
    grace_ms: int


StatePlan: TypeAlias = StatefulPlan | WindowPlan
"""A node that keeps state per key (snapshotted, see ``docs/stateful.md``)."""

TerminalPlan: TypeAlias = TopicSinkPlan | NamedSinkPlan | DrainPlan
ChainPlan: TypeAlias = StepPlan | CollectPlan | AsyncPlan | StatefulPlan | WindowPlan


@dataclass(frozen=True)
class RoutePlan:
    predicate: Callable[[Any], bool]
    branch: BranchPlan


@dataclass(frozen=True)
class RouterPlan:
    node_id: str
    routes: tuple[RoutePlan, ...]
    default: BranchPlan | None


@dataclass(frozen=True)
class BranchPlan:
    steps: tuple[ChainPlan, ...]
    end: TerminalPlan | RouterPlan

    def terminals(self) -> Iterator[TerminalPlan]:
        """Every terminal reachable from this branch, depth first."""
        if isinstance(self.end, RouterPlan):
            for route in self.end.routes:
                yield from route.branch.terminals()
            if self.end.default is not None:
                yield from self.end.default.terminals()
        else:
            yield self.end

    def nodes(self) -> Iterator[Any]:
        """Every plan node of this branch and the branches below it: steps, routers, terminals."""
        yield from self.steps
        yield self.end
        if isinstance(self.end, RouterPlan):
            for route in self.end.routes:
                yield from route.branch.nodes()
            if self.end.default is not None:
                yield from self.end.default.nodes()

    def chain_nodes(self) -> Iterator[ChainPlan]:
        """Every step in this branch and the branches below it."""
        yield from self.steps
        if isinstance(self.end, RouterPlan):
            for route in self.end.routes:
                yield from route.branch.chain_nodes()
            if self.end.default is not None:
                yield from self.end.default.chain_nodes()


@dataclass(frozen=True)
class FlowPlan:
    """A flow ready to execute: validated, bound to topics, ids assigned."""

    name: str
    source: SourcePlan
    root: BranchPlan
    error_routes: dict[ErrorKind, TerminalPlan]
    node_count: int

    @property
    def has_async(self) -> bool:
        return any(isinstance(node, AsyncPlan) for node in self.root.chain_nodes())

    def state_nodes(self) -> list[StatePlan]:
        """The nodes that keep state, in plan order."""
        return [
            node for node in self.root.chain_nodes() if isinstance(node, StatefulPlan | WindowPlan)
        ]

    @property
    def tick_interval_ms(self) -> int | None:
        """How often idle workers must wake buffered nodes, or None if never.

        Collect timeouts need a wake-up well inside their window; async steps
        need one to hand back finished results while no input arrives;
        stateful nodes need one to advance event time while the input is
        idle (closing windows, expiring keys) and to complete snapshots.
        """
        intervals = [
            max(1, node.timeout_ms // 4)
            for node in self.root.chain_nodes()
            if isinstance(node, CollectPlan)
        ]
        if self.has_async:
            intervals.append(5)
        if self.state_nodes():
            intervals.append(STATE_TICK_MS)
        return min(intervals) if intervals else None

    def logical_topics(self) -> list[str]:
        """The flow's logical topics: its source and every topic it writes, each once."""
        sinks = [t.binding.logical for t in self.sink_terminals() if isinstance(t, TopicSinkPlan)]
        return list(dict.fromkeys([self.source.binding.logical, *sinks]))

    def sink_topics(self) -> list[str]:
        """Physical topics the flow writes to (outputs and dead letters), each once."""
        topics = [t.binding.physical for t in self.sink_terminals() if isinstance(t, TopicSinkPlan)]
        return list(dict.fromkeys(topics))

    def sink_terminals(self) -> list[TerminalPlan]:
        """Terminals of records and of errors, each once."""
        seen: dict[str, TerminalPlan] = {}
        for terminal in [*self.root.terminals(), *self.error_routes.values()]:
            seen.setdefault(terminal.node_id, terminal)
        return list(seen.values())
