"""``compile_flow``: validate a declaration and produce a :class:`FlowPlan`.

The compiler runs before any broker is touched and reports every problem it
finds in ONE :class:`FlowValidationError`, so a developer fixes a flow in one
round instead of one error per restart. It checks structure (what may follow
what), bindings (topics and sinks present in the config), codecs, numbers,
error routing, and, where functions carry annotations, that each step accepts
what the previous one produces.
"""

from __future__ import annotations

import collections.abc
import contextlib
import difflib
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loom.config.context import ConfigContext
from loom.config.settings import topic_variable
from loom.streaming.codecs import build_codec
from loom.streaming.errors import ErrorKind, FlowValidationError
from loom.streaming.message import Message
from loom.streaming.nodes import (
    FromTopic,
    IntoTopic,
    Node,
    Process,
    StreamFlow,
    display_name,
)
from loom.streaming.plan import (
    BranchPlan,
    ChainPlan,
    FlowPlan,
    RouterPlan,
    SourcePlan,
    StepKind,
    TerminalPlan,
    TopicBinding,
)
from loom.streaming.registry import node_type_of

UNKNOWN: Any = object()
"""The payload type at a point of the flow when annotations do not tell it."""

_ITERABLES = {
    collections.abc.Iterable,
    collections.abc.Iterator,
    collections.abc.Generator,
    collections.abc.Sequence,
    list,
    tuple,
    set,
    frozenset,
}


ROUTED_IF_RAISED = frozenset({ErrorKind.LATE})
"""Error kinds a flow must route only when one of its nodes can raise them, so
that adding such a kind does not break flows that route every kind by name."""


@dataclass(frozen=True)
class _Signature:
    """What the compiler learns about a step function."""

    is_async: bool
    takes_message: bool
    accepts: Any
    returns: Any


@dataclass
class Stream:
    """The state of records between two nodes: their type and whether batched."""

    payload: Any
    batched: bool = False
    stateful: str | None = None
    from_batches: bool = False
    """Records come from a ``BatchStep``: they have no single input record."""
    """The stateful node upstream of here, if any (one per path: see ``StatefulStep``)."""


@dataclass
class Compiler:
    flow: StreamFlow[Any, Any]
    config: ConfigContext
    problems: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    declared_topics: dict[str, None] = field(default_factory=dict)
    """Logical topics met so far, in order (a dict as an ordered set)."""
    declared_sinks: dict[str, None] = field(default_factory=dict)
    """Names of registered sinks met so far (``IntoSink``), in order."""
    node_count: int = 0
    raised: set[ErrorKind] = field(default_factory=set)
    """Kinds raised by nodes met so far that only some flows must route (``ROUTED_IF_RAISED``)."""

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def claim_id(self, base: str) -> str:
        """A unique Bytewax-safe step id derived from ``base``."""
        self.node_count += 1
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", base).strip("_") or "node"
        candidate, suffix = stem, 2
        while candidate in self.ids:
            candidate, suffix = f"{stem}_{suffix}", suffix + 1
        self.ids.add(candidate)
        return candidate

    # -- topics and sinks -------------------------------------------------

    def bind(self, where: str, declared: FromTopic[Any] | IntoTopic[Any]) -> TopicBinding | None:
        self.declared_topics[declared.topic] = None
        physical = self.config.topics.get(declared.topic)
        if physical is None:
            variable = topic_variable(declared.topic)
            self.problem(
                f"{where}: logical topic {declared.topic!r} is not bound to a topic "
                f"(set topics.{declared.topic} in the config or {variable})"
            )
        try:
            codec = build_codec(declared.codec, declared.payload)
        except ValueError as exc:
            self.problem(f"{where}: {exc}")
            return None
        if physical is None:
            return None
        return TopicBinding(declared.topic, physical, codec, declared.payload)

    def terminal(self, node: Any, stream: Stream | None, where: str) -> TerminalPlan | None:
        """Compile a terminal: the end of a branch, an output or an error route."""
        spec = node_type_of(node)
        if spec is None or spec.role != "terminal":
            self.problem(f"{where}: {node!r} is not a terminal (IntoTopic, IntoSink or Drain)")
            return None
        plan: TerminalPlan | None = spec.compile(self, node, stream, where)
        return plan

    # -- steps ------------------------------------------------------------

    def signature(self, fn: Any, where: str) -> _Signature | None:
        if not callable(fn):
            self.problem(f"{where}: {fn!r} is not callable")
            return None
        is_async = inspect.iscoroutinefunction(fn)
        try:
            hints = typing.get_type_hints(fn)
            params = list(inspect.signature(fn).parameters.values())
        except (NameError, TypeError, ValueError):
            return _Signature(is_async, False, UNKNOWN, UNKNOWN)
        if not params:
            self.problem(f"{where}: {display_name(fn)} must take the record as its first argument")
            return None
        accepts = hints.get(params[0].name, UNKNOWN)
        element = _element_type(accepts, None)
        if _is_message(element):
            batch_of = types.GenericAlias(list, (_unwrap_message(element),))
            return _Signature(is_async, True, batch_of, hints.get("return", UNKNOWN))
        takes_message = _is_message(accepts)
        if takes_message:
            accepts = _unwrap_message(accepts)
        return _Signature(is_async, takes_message, accepts, hints.get("return", UNKNOWN))

    def check_type(self, stream: Stream, expected: Any, where: str) -> None:
        actual = stream.payload
        if stream.batched:
            expected = _element_type(expected, UNKNOWN)
        if _is_class(actual) and _is_class(expected) and not issubclass(actual, expected):
            self.problem(
                f"{where} expects {display_name(expected)} but receives {display_name(actual)} "
                "from the previous node"
            )

    def check_batching(self, kind: StepKind, stream: Stream, where: str) -> None:
        if kind == "batch" and not stream.batched:
            self.problem(f"{where}: a batch step needs a CollectBatch right before it")
        if kind != "batch" and stream.batched:
            self.problem(f"{where}: receives batches from CollectBatch; use BatchStep")

    def advance(self, stream: Stream, kind: StepKind, returns: Any) -> None:
        stream.batched = False
        if kind == "record":
            stream.payload = _unwrap_message(_strip_optional(returns))
        else:
            stream.payload = _unwrap_message(_element_type(returns, UNKNOWN))

    # -- structure --------------------------------------------------------

    def branch(
        self, nodes: tuple[Any, ...], stream: Stream, where: str, output: Node | None = None
    ) -> BranchPlan | None:
        steps: list[ChainPlan] = []
        end: TerminalPlan | RouterPlan | None = None
        ended_by: str | None = None
        for node in nodes:
            if ended_by is not None:
                self.problem(
                    f"{where}: {type(node).__name__} comes after the terminal node "
                    f"{ended_by}; a terminal or router must be last"
                )
                continue
            spec = node_type_of(node)
            if spec is None:
                self.problem(f"{where}: {node!r} is not a flow node")
                continue
            if spec.role == "step":
                plan: ChainPlan | None = spec.compile(self, node, stream, where)
                if plan is not None:
                    steps.append(plan)
                continue
            self.check_batching("record", stream, type(node).__name__)
            end = spec.compile(self, node, stream, where)
            ended_by = type(node).__name__
        if output is not None:
            if ended_by is not None:
                self.problem(
                    f"{where}: the flow has an output but its process already ends in "
                    f"{ended_by}; drop output= or the terminal"
                )
            else:
                self.check_batching("record", stream, "the flow output")
                end = self.terminal(output, stream, "flow output")
                ended_by = "output"
        if ended_by is None:
            self.problem(
                f"{where}: records reaching the end have nowhere to go; end it with "
                "IntoTopic, IntoSink, Drain or a Router, or give the flow an output"
            )
        if end is None:
            return None
        return BranchPlan(tuple(steps), end)

    def route_target(self, target: Any, stream: Stream, where: str) -> BranchPlan | None:
        nodes = target.nodes if isinstance(target, Process) else (target,)
        return self.branch(nodes, Stream(stream.payload, stateful=stream.stateful), where)

    def error_routes(self) -> dict[ErrorKind, TerminalPlan]:
        declared = self.flow.errors
        if declared is None:
            pairs: list[tuple[Any, Any]] = []
        elif isinstance(declared, collections.abc.Mapping):
            pairs = list(declared.items())
        else:
            pairs = [(tuple(ErrorKind), declared)]
        routes: dict[ErrorKind, TerminalPlan] = {}
        built: dict[int, TerminalPlan | None] = {}
        seen: set[ErrorKind] = set()
        for key, target in pairs:
            if id(target) not in built:
                built[id(target)] = self.terminal(target, None, "errors")
            for kind in key if isinstance(key, tuple) else (key,):
                if not isinstance(kind, ErrorKind):
                    self.problem(f"errors: {kind!r} is not an ErrorKind")
                elif kind in seen:
                    self.problem(f"errors: ErrorKind.{kind.name} is routed more than once")
                else:
                    seen.add(kind)
                    plan = built[id(target)]
                    if plan is not None:
                        routes[kind] = plan
        missing = [
            kind
            for kind in ErrorKind
            if kind not in seen and (kind not in ROUTED_IF_RAISED or kind in self.raised)
        ]
        if missing:
            names = ", ".join(f"ErrorKind.{kind.name}" for kind in missing)
            self.problem(
                f"errors: {names} have no route; give errors=IntoTopic(...) for all kinds "
                "or route them explicitly (Drain() discards on purpose)"
            )
        return routes

    def compile(self) -> FlowPlan:
        flow = self.flow
        if not isinstance(flow.name, str) or not flow.name.strip():
            self.problem("the flow needs a non-empty name")
        if not isinstance(flow.source, FromTopic):
            self.problem(f"source must be FromTopic(...), got {flow.source!r}")
            raise FlowValidationError(str(flow.name), self.problems)
        source_id = self.claim_id(f"from_{flow.source.topic}")
        source = self.bind(f"FromTopic {flow.source.topic!r}", flow.source)
        if not isinstance(flow.process, Process):
            self.problem(f"process must be Process(...), got {flow.process!r}")
            raise FlowValidationError(str(flow.name), self.problems)
        root = self.branch(
            flow.process.nodes, Stream(flow.source.payload or UNKNOWN), "process", flow.output
        )
        errors = self.error_routes()
        if self.problems or source is None or root is None:
            raise FlowValidationError(flow.name, self.problems or ["flow is incomplete"])
        return FlowPlan(flow.name, SourcePlan(source_id, source), root, errors, self.node_count)


def compile_flow(
    flow: StreamFlow[Any, Any], config: ConfigContext | collections.abc.Mapping[str, Any]
) -> FlowPlan:
    """Validate ``flow`` against ``config`` and return its executable plan.

    ``config`` is a :class:`ConfigContext` or its plain-dict form, the
    mapping a YAML config file holds (``{"topics": {"input": "orders.v1"}}``).

    :raises FlowValidationError: listing every problem found.
    :raises pydantic.ValidationError: the dict is not a valid configuration.
    """
    if not isinstance(config, ConfigContext):
        config = ConfigContext.from_dict(config)
    return Compiler(flow, config).compile()


def logical_topics(flow: StreamFlow[Any, Any]) -> tuple[str, ...]:
    """Every logical topic ``flow`` declares (source, outputs, routes, errors).

    The compiler's own walk, run without bindings: the environment contract
    (``loom env``) is derived from the same rules that check a deployment.
    """
    return declared_names(flow)[0]


def declared_names(flow: StreamFlow[Any, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The logical topics and the sink names ``flow`` declares, in order."""
    compiler = Compiler(flow, ConfigContext())
    with contextlib.suppress(FlowValidationError):
        compiler.compile()
    return tuple(compiler.declared_topics), tuple(compiler.declared_sinks)


def compile_unbound(flow: StreamFlow[Any, Any]) -> FlowPlan:
    """Compile ``flow`` with every topic and sink it names counted as bound.

    Bindings belong to a deployment, not to the declaration: this checks
    everything else (``loom graph`` draws from the result).

    :raises FlowValidationError: listing every other problem.
    """
    topics, sinks = declared_names(flow)
    config = ConfigContext.from_dict(
        {
            "topics": {topic: topic for topic in topics},
            "streaming": {"sinks": {sink: {"type": "any"} for sink in sinks}},
        }
    )
    return compile_flow(flow, config)


def unused_bindings(declared: Sequence[str], topics: Mapping[str, str]) -> list[str]:
    """Bindings in ``topics`` for logical topics not in ``declared``, one line each.

    ``declared`` are a flow's logical topics (:func:`logical_topics`, or a
    compiled plan's ``logical_topics()``). :func:`compile_flow` accepts other
    bindings (one config file may serve several flows); a service, whose
    environment belongs to one flow, refuses them: ``LOOM_TOPICS__INPUTT`` is
    a typo, not a setting to ignore.
    """
    variables = [topic_variable(topic) for topic in declared]
    problems = []
    for logical in sorted(set(topics).difference(declared)):
        variable = topic_variable(logical)
        close = difflib.get_close_matches(variable, variables, n=1, cutoff=0.75)
        hint = f"; did you mean {close[0]}?" if close else ""
        problems.append(
            f"{variable} (topics.{logical}): the flow declares no logical topic "
            f"{logical!r}{hint} (its topics: {', '.join(sorted(declared)) or 'none'})"
        )
    return problems


def _is_class(tp: Any) -> bool:
    return isinstance(tp, type) and tp is not object


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        return args[0] if len(args) == 1 else UNKNOWN
    return tp


def _is_message(tp: Any) -> bool:
    return tp is Message or typing.get_origin(tp) is Message


def _unwrap_message(tp: Any) -> Any:
    if tp is Message:
        return UNKNOWN
    if typing.get_origin(tp) is Message:
        return typing.get_args(tp)[0]
    return tp


def _element_type(tp: Any, default: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in _ITERABLES:
        args = typing.get_args(tp)
        return args[0] if args else default
    return default
