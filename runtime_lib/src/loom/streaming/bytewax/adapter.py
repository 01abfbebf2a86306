"""The one place a :class:`FlowPlan` becomes Bytewax operators.

Shape of the dataflow (all operators are worker-local; nothing is exchanged
between workers, which is what lets acks live in plain Python objects):

    input ─ map(step) ─ … ─┬─ map(encode) ─ output(topic)
                           └─ map(router) ─ map(route i) ─ … (each branch ends in a sink)
    every terminal ─ filter_map(failures) ─ merge ─ filter_map(kinds) ─ output(error sink)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from operator import itemgetter
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow, Stream
from bytewax.outputs import DynamicSink

from loom.delivery.transport import Transport
from loom.observability import ObservabilityRuntime
from loom.observability.logs import DeadLetterLog
from loom.observability.metrics import DropReason, observe_many
from loom.streaming.bytewax.bridge import AsyncBridge, AsyncOp, RetryingAsyncOp
from loom.streaming.bytewax.operators import (
    ChunkOp,
    CollectOp,
    DeadLetterEncoder,
    DrainOp,
    EncodeOp,
    ExpandOp,
    RecordOp,
    RouterOp,
    SelectErrors,
    drain_errors,
    envelopes,
    to_messages,
)
from loom.streaming.bytewax.outputs import AckingSink, TopicSink
from loom.streaming.bytewax.records import Chunk, Failure, Outbound
from loom.streaming.bytewax.retries import RetryOp
from loom.streaming.bytewax.source import FlowSource
from loom.streaming.bytewax.stateful import StatefulOp
from loom.streaming.bytewax.windowing import window_operator
from loom.streaming.bytewax.worker import RunState
from loom.streaming.errors import ErrorKind
from loom.streaming.plan import (
    AsyncPlan,
    BranchPlan,
    CollectPlan,
    DrainPlan,
    FlowPlan,
    NamedSinkPlan,
    RouterPlan,
    StatefulPlan,
    StepPlan,
    TerminalPlan,
    TopicBinding,
    TopicSinkPlan,
    WindowPlan,
)
from loom.streaming.registry import node_types


def _failures_of(outbound: Outbound) -> list[Failure] | None:
    return outbound.failures or None


def _nothing(chunk: Chunk) -> str | None:
    return None


def _ignore(step_id: str, item: Any) -> None:
    pass


def _keep_state(state: None, value: Any) -> tuple[None, None]:
    return None, None


def _recovery_anchor(chunks: Stream[Chunk]) -> None:
    """Give a recovery-enabled dataflow one stateful operator.

    Bytewax 0.21.1 ends a recovery-enabled execution right after the first
    batch when the dataflow has no stateful operator (nothing produces
    snapshots). Loom's operators keep no Bytewax state, so this adds a keyed
    ``stateful_map`` on an always-empty stream: no record ever reaches it (and
    none is exchanged between workers), it only keeps recovery running.
    """
    empty: Stream[str] = op.filter_map("recovery_anchor__empty", chunks, _nothing)
    keyed = op.key_on("recovery_anchor__key", empty, str)
    op.stateful_map("recovery_anchor", keyed, _keep_state)


class DataflowBuilder:
    """Builds the Bytewax ``Dataflow`` of one plan for one run."""

    def __init__(
        self,
        plan: FlowPlan,
        *,
        source: Transport,
        sink: Transport,
        named_sinks: Mapping[str, DynamicSink[Any]],
        error_sinks: Mapping[ErrorKind, DynamicSink[Any]],
        bridge: AsyncBridge | None,
        run: RunState,
        observability: ObservabilityRuntime | None = None,
        recovery: bool = False,
    ) -> None:
        self.plan = plan
        self.source = source
        self.sink = sink
        self.named_sinks = named_sinks
        self.error_sinks = error_sinks
        self.bridge = bridge
        self.run = run
        self.observability = observability
        self.recovery = recovery
        self._failure_streams: list[Stream[list[Failure]]] = []
        self._has_output = False
        self.metrics = observability.metrics if observability is not None else None
        self.dead_letter_log = (
            observability.dead_letter_log if observability is not None else DeadLetterLog()
        )

    def build(self) -> Dataflow:
        flow = Dataflow(self.plan.name.replace(".", "_"))
        chunks = op.input(
            self.plan.source.node_id,
            flow,
            FlowSource(self.plan, self.source, self.run, self.observability),
        )
        self._branch(self.plan.root, chunks)
        failures = op.merge("failures", *self._failure_streams)
        self._errors(failures)
        if not self._has_output:
            # Every terminal is a Drain(): Bytewax refuses a dataflow without an
            # output or inspect step, so inspect the (usually empty) failures.
            op.inspect("drained", failures, _ignore)
        if self.recovery:
            _recovery_anchor(chunks)
        return flow

    def _output(self, step_id: str, stream: Stream[Any], sink: DynamicSink[Any]) -> None:
        self._has_output = True
        op.output(step_id, stream, sink)

    # -- records ----------------------------------------------------------

    def _branch(self, branch: BranchPlan, stream: Stream[Chunk]) -> None:
        for step in branch.steps:
            stream = self._node(step, stream)
        self._node(branch.end, stream)

    def _node(self, node: Any, stream: Stream[Chunk]) -> Any:
        """The operators of one plan node, by its registered builder."""
        return _OPERATORS[type(node)](self, node, stream)

    def map_step(
        self, node_id: str, stream: Stream[Chunk], operator: ChunkOp, *, timed: bool = True
    ) -> Stream[Chunk]:
        """Run a step's ``operator`` on every chunk (timed into ``loom_step_seconds``)."""
        if timed:
            operator = self._timed(node_id, operator)
        return op.map(node_id, stream, operator)

    # -- the built-in operators (registered at the end of the module) -------

    def _step(self, step: StepPlan, stream: Stream[Chunk]) -> Stream[Chunk]:
        if step.retry is not None:  # decided once per step, not per record
            return self.map_step(step.node_id, stream, RetryOp(self.plan.name, step, self.metrics))
        if step.kind == "record":
            return self.map_step(step.node_id, stream, RecordOp(self.plan.name, step, self.metrics))
        return self.map_step(step.node_id, stream, ExpandOp(self.plan.name, step, self.metrics))

    def _async(self, step: AsyncPlan, stream: Stream[Chunk]) -> Stream[Chunk]:
        if self.bridge is None:
            raise RuntimeError(f"{step.node_id} is async but the run has no AsyncBridge")
        op_class = AsyncOp if step.retry is None else RetryingAsyncOp
        operator = op_class(self.plan.name, step, self.bridge, self.run, self.metrics)
        return self.map_step(step.node_id, stream, operator, timed=False)  # times each call

    def _collect(self, step: CollectPlan, stream: Stream[Chunk]) -> Stream[Chunk]:
        return self.map_step(step.node_id, stream, CollectOp(step))

    def _stateful(self, step: StatefulPlan, stream: Stream[Chunk]) -> Stream[Chunk]:
        operator = StatefulOp(self.plan.name, step, self.run, self.metrics)
        return self.map_step(step.node_id, stream, operator)

    def _window(self, step: WindowPlan, stream: Stream[Chunk]) -> Stream[Chunk]:
        operator = window_operator(self.plan.name, step, self.run, self.metrics)
        return self.map_step(step.node_id, stream, operator)

    def _router(self, end: RouterPlan, stream: Stream[Chunk]) -> None:
        split = op.map(end.node_id, stream, RouterOp(self.plan.name, end))
        targets = [route.branch for route in end.routes]
        if end.default is not None:
            targets.append(end.default)
        for index, target in enumerate(targets):
            self._branch(target, op.map(f"{end.node_id}__{index}", split, itemgetter(index)))

    def _timed(self, node: str, operator: ChunkOp) -> ChunkOp:
        """Observe the step's time per record: every record at the chunk's mean, once per chunk."""
        if self.metrics is None:
            return operator
        histogram = self.metrics.step_seconds.labels(self.plan.name, node)

        def timed(chunk: Chunk) -> Chunk:
            count = len(chunk.records)
            if not count:
                return operator(chunk)
            started = time.perf_counter()
            result = operator(chunk)
            observe_many(histogram, (time.perf_counter() - started) / count, count)
            return result

        return timed

    def _topic_sink(self, binding: TopicBinding, node: str) -> TopicSink:
        produced = None
        if self.observability is not None:
            produced = self.observability.metrics.produced.labels(self.plan.name, binding.physical)
        return TopicSink(
            self.sink, binding, self.run, flow=self.plan.name, node=node, produced=produced
        )

    def end(self, node_id: str, outbound: Stream[Outbound]) -> None:
        """Route the failures a terminal's operators produced to the error routes."""
        self._failure_streams.append(op.filter_map(f"{node_id}__failures", outbound, _failures_of))

    def _into_topic(self, terminal: TopicSinkPlan, stream: Stream[Chunk]) -> None:
        node = terminal.node_id
        encode = EncodeOp(self.plan.name, node, terminal.binding)
        outbound = op.map(f"{node}__encode", stream, encode)
        self._output(node, outbound, self._topic_sink(terminal.binding, node))
        self.end(node, outbound)

    def _into_sink(self, terminal: NamedSinkPlan, stream: Stream[Chunk]) -> None:
        node = terminal.node_id
        outbound = op.map(f"{node}__messages", stream, to_messages)
        self._output(node, outbound, AckingSink(self.named_sinks[terminal.name]))
        self.end(node, outbound)

    def _drain(self, terminal: DrainPlan, stream: Stream[Chunk]) -> None:
        node = terminal.node_id
        dropped = None
        if self.metrics is not None:
            dropped = self.metrics.dropped.labels(self.plan.name, node, DropReason.DRAINED)
        self.end(node, op.map(node, stream, DrainOp(dropped, node)))

    # -- errors -----------------------------------------------------------

    def _errors(self, failures: Stream[list[Failure]]) -> None:
        by_terminal: dict[str, tuple[TerminalPlan, list[ErrorKind]]] = {}
        for kind, terminal in self.plan.error_routes.items():
            if kind not in self.error_sinks:
                by_terminal.setdefault(terminal.node_id, (terminal, []))[1].append(kind)
        for node, (terminal, kinds) in by_terminal.items():
            chosen = op.filter_map(f"errors__{node}", failures, self._select(kinds, terminal))
            self._error_terminal(terminal, chosen)
        for kind, sink in self.error_sinks.items():
            label = type(sink).__name__
            chosen = op.filter_map(f"errors__{kind.value}", failures, self._select([kind], label))
            outbound = op.map(f"errors__{kind.value}__envelopes", chosen, envelopes)
            self._output(f"errors__{kind.value}__sink", outbound, AckingSink(sink))

    def _select(self, kinds: list[ErrorKind], target: TerminalPlan | str) -> SelectErrors:
        """Choose, count and log the failures of ``kinds`` for ``target``."""
        if isinstance(target, TopicSinkPlan):
            label = target.binding.physical
        elif isinstance(target, NamedSinkPlan):
            label = target.name
        elif isinstance(target, DrainPlan):
            label = "drain"
        else:
            label = target
        counter = self.metrics.dead_lettered if self.metrics is not None else None
        return SelectErrors(kinds, counter, (self.plan.name, label), self.dead_letter_log)

    def _error_terminal(self, terminal: TerminalPlan, failures: Stream[list[Failure]]) -> None:
        node = f"errors__{terminal.node_id}"
        if isinstance(terminal, TopicSinkPlan):
            records = op.map(f"{node}__encode", failures, DeadLetterEncoder(terminal.binding.codec))
            self._output(f"{node}__sink", records, self._topic_sink(terminal.binding, node))
        elif isinstance(terminal, NamedSinkPlan):
            outbound = op.map(f"{node}__envelopes", failures, envelopes)
            self._output(f"{node}__sink", outbound, AckingSink(self.named_sinks[terminal.name]))
        elif isinstance(terminal, DrainPlan):
            op.map(f"{node}__drain", failures, drain_errors)


Operator = Callable[[DataflowBuilder, Any, Stream[Chunk]], Stream[Chunk] | None]
"""Builds the Bytewax operators of one plan node: a step returns the stream of
its results (see :meth:`DataflowBuilder.map_step`); a terminal or router
returns ``None`` (a terminal hands its failures to :meth:`DataflowBuilder.end`)."""

_OPERATORS: dict[type, Operator] = {
    StepPlan: DataflowBuilder._step,
    AsyncPlan: DataflowBuilder._async,
    CollectPlan: DataflowBuilder._collect,
    StatefulPlan: DataflowBuilder._stateful,
    WindowPlan: DataflowBuilder._window,
    RouterPlan: DataflowBuilder._router,
    TopicSinkPlan: DataflowBuilder._into_topic,
    NamedSinkPlan: DataflowBuilder._into_sink,
    DrainPlan: DataflowBuilder._drain,
}


def register_operator(plan_type: type, build: Operator) -> None:
    """Run plan nodes of ``plan_type`` (a registered node type's plan class) with ``build``."""
    if plan_type in _OPERATORS:
        raise ValueError(f"an operator for {plan_type.__name__} is registered already")
    _OPERATORS[plan_type] = build


def missing_operators(plan: FlowPlan | None = None) -> list[str]:
    """Node types without an operator, one line each: in ``plan``, or all registered ones."""
    if plan is None:
        wanted = [spec.plan for spec in node_types()]
    else:
        wanted = [type(node) for node in plan.root.nodes()]
        wanted += [type(terminal) for terminal in plan.error_routes.values()]
    return [
        f"{plan_type.__name__}: no Bytewax operator is registered for it "
        "(loom.streaming.bytewax.adapter.register_operator)"
        for plan_type in dict.fromkeys(wanted)
        if plan_type not in _OPERATORS
    ]


# Every built-in node type has its operator: checked once, when the adapter is
# imported. A node type registered later is checked when a runner compiles a
# flow (StreamingRunner), before anything runs.
if missing_operators():
    raise TypeError("; ".join(missing_operators()))
