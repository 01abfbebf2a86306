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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from loom.config.context import ConfigContext
from loom.config.settings import topic_variable
from loom.streaming.codecs import build_codec
from loom.streaming.errors import ErrorKind, FlowValidationError
from loom.streaming.message import Message
from loom.streaming.nodes import (
    BatchStep,
    CollectBatch,
    Drain,
    ExpandStep,
    FromTopic,
    IntoSink,
    IntoTopic,
    Node,
    Process,
    RecordStep,
    Router,
    StreamFlow,
    WithAsync,
    display_name,
)
from loom.streaming.plan import (
    AsyncPlan,
    BranchPlan,
    ChainPlan,
    CollectPlan,
    DrainPlan,
    FlowPlan,
    NamedSinkPlan,
    RoutePlan,
    RouterPlan,
    SourcePlan,
    StepKind,
    StepPlan,
    TerminalPlan,
    TopicBinding,
    TopicSinkPlan,
)

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


@dataclass(frozen=True)
class _Signature:
    """What the compiler learns about a step function."""

    is_async: bool
    takes_message: bool
    accepts: Any
    returns: Any


@dataclass
class _Stream:
    """The state of records between two nodes: their type and whether batched."""

    payload: Any
    batched: bool = False


@dataclass
class _Compiler:
    flow: StreamFlow[Any, Any]
    config: ConfigContext
    problems: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    declared_topics: dict[str, None] = field(default_factory=dict)
    """Logical topics met so far, in order (a dict as an ordered set)."""
    node_count: int = 0

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

    def terminal(self, node: Node, stream: _Stream | None, where: str) -> TerminalPlan | None:
        if isinstance(node, IntoTopic):
            node_id = self.claim_id(f"into_{node.topic}")
            binding = self.bind(f"IntoTopic {node.topic!r} ({where})", node)
            if stream is not None:
                self.check_type(stream, node.payload, f"IntoTopic {node.topic!r}")
            return TopicSinkPlan(node_id, binding) if binding else None
        if isinstance(node, IntoSink):
            node_id = self.claim_id(f"sink_{node.sink}")
            settings = self.config.streaming.sinks.get(node.sink)
            if settings is None:
                self.problem(
                    f"IntoSink {node.sink!r} ({where}): no sink named {node.sink!r} "
                    "under streaming.sinks in the config"
                )
                return None
            return NamedSinkPlan(node_id, node.sink, settings.type, dict(settings.options))
        if isinstance(node, Drain):
            return DrainPlan(self.claim_id(node.name or "drain"))
        self.problem(f"{where}: {node!r} is not a terminal (IntoTopic, IntoSink or Drain)")
        return None

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

    def check_type(self, stream: _Stream, expected: Any, where: str) -> None:
        actual = stream.payload
        if stream.batched:
            expected = _element_type(expected, UNKNOWN)
        if _is_class(actual) and _is_class(expected) and not issubclass(actual, expected):
            self.problem(
                f"{where} expects {display_name(expected)} but receives {display_name(actual)} "
                "from the previous node"
            )

    def step(self, node: RecordStep | ExpandStep | BatchStep, stream: _Stream) -> ChainPlan | None:
        kind: StepKind = _STEP_KINDS[type(node)]
        node_id = self.claim_id(node.name or display_name(node.fn))
        where = f"{type(node).__name__} {node_id!r}"
        sig = self.signature(node.fn, where)
        self.check_batching(kind, stream, where)
        if sig is None:
            return None
        if sig.is_async:
            self.problem(
                f"{where}: {display_name(node.fn)} is async; wrap the step in WithAsync(...)"
            )
        self.check_type(stream, sig.accepts, where)
        self.advance(stream, kind, sig.returns)
        return StepPlan(node_id, kind, node.fn, sig.takes_message)

    def with_async(self, node: WithAsync, stream: _Stream) -> ChainPlan | None:
        inner = node.fn
        fn = inner.fn if isinstance(inner, RecordStep | ExpandStep | BatchStep) else inner
        kind: StepKind = _STEP_KINDS.get(type(inner), "batch" if stream.batched else "record")
        node_id = self.claim_id(node.name or getattr(inner, "name", None) or display_name(fn))
        where = f"WithAsync {node_id!r}"
        if node.max_concurrency < 1:
            self.problem(f"{where}: max_concurrency must be >= 1, got {node.max_concurrency}")
        if node.timeout_ms is not None and node.timeout_ms < 1:
            self.problem(f"{where}: timeout_ms must be >= 1 or None, got {node.timeout_ms}")
        self.check_batching(kind, stream, where)
        sig = self.signature(fn, where)
        if sig is None:
            return None
        if not sig.is_async:
            self.problem(f"{where}: {display_name(fn)} is not an async function (use RecordStep)")
        self.check_type(stream, sig.accepts, where)
        self.advance(stream, kind, sig.returns)
        return AsyncPlan(
            node_id, kind, fn, sig.takes_message, node.max_concurrency, node.timeout_ms
        )

    def check_batching(self, kind: StepKind, stream: _Stream, where: str) -> None:
        if kind == "batch" and not stream.batched:
            self.problem(f"{where}: a batch step needs a CollectBatch right before it")
        if kind != "batch" and stream.batched:
            self.problem(f"{where}: receives batches from CollectBatch; use BatchStep")

    def advance(self, stream: _Stream, kind: StepKind, returns: Any) -> None:
        stream.batched = False
        if kind == "record":
            stream.payload = _unwrap_message(_strip_optional(returns))
        else:
            stream.payload = _unwrap_message(_element_type(returns, UNKNOWN))

    def collect(self, node: CollectBatch, stream: _Stream) -> ChainPlan:
        node_id = self.claim_id(node.name or "collect_batch")
        where = f"CollectBatch {node_id!r}"
        if node.max_records < 1:
            self.problem(f"{where}: max_records must be >= 1, got {node.max_records}")
        if node.timeout_ms < 1:
            self.problem(f"{where}: timeout_ms must be >= 1, got {node.timeout_ms}")
        if stream.batched:
            self.problem(f"{where}: follows another CollectBatch")
        stream.batched = True
        return CollectPlan(node_id, node.max_records, node.timeout_ms)

    # -- structure --------------------------------------------------------

    def branch(
        self, nodes: tuple[Any, ...], stream: _Stream, where: str, output: Node | None = None
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
            if isinstance(node, RecordStep | ExpandStep | BatchStep):
                plan: ChainPlan | None = self.step(node, stream)
            elif isinstance(node, WithAsync):
                plan = self.with_async(node, stream)
            elif isinstance(node, CollectBatch):
                plan = self.collect(node, stream)
            elif isinstance(node, Router):
                self.check_batching("record", stream, "Router")
                end = self.router(node, stream, where)
                ended_by = "Router"
                continue
            elif isinstance(node, IntoTopic | IntoSink | Drain):
                self.check_batching("record", stream, type(node).__name__)
                end = self.terminal(node, stream, where)
                ended_by = type(node).__name__
                continue
            else:
                self.problem(f"{where}: {node!r} is not a flow node")
                continue
            if plan is not None:
                steps.append(plan)
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

    def router(self, node: Router, stream: _Stream, where: str) -> RouterPlan | None:
        node_id = self.claim_id(node.name or "router")
        if not node.routes and node.default is None:
            self.problem(f"Router {node_id!r}: has no routes")
        routes: list[RoutePlan] = []
        for index, route in enumerate(node.routes):
            route_where = f"route {index} of Router {node_id!r}"
            if not callable(route.when):
                self.problem(f"{route_where}: when={route.when!r} is not callable")
            branch = self.route_target(route.to, stream, route_where)
            if branch is not None and callable(route.when):
                routes.append(RoutePlan(route.when, branch))
        default = None
        if node.default is not None:
            default = self.route_target(node.default, stream, f"default of Router {node_id!r}")
        if len(routes) != len(node.routes):
            return None
        return RouterPlan(node_id, tuple(routes), default)

    def route_target(self, target: Any, stream: _Stream, where: str) -> BranchPlan | None:
        nodes = target.nodes if isinstance(target, Process) else (target,)
        return self.branch(nodes, _Stream(stream.payload), where)

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
        missing = [kind for kind in ErrorKind if kind not in seen]
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
            flow.process.nodes, _Stream(flow.source.payload or UNKNOWN), "process", flow.output
        )
        errors = self.error_routes()
        if self.problems or source is None or root is None:
            raise FlowValidationError(flow.name, self.problems or ["flow is incomplete"])
        return FlowPlan(flow.name, SourcePlan(source_id, source), root, errors, self.node_count)


_STEP_KINDS: dict[type, StepKind] = {RecordStep: "record", ExpandStep: "expand", BatchStep: "batch"}


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
    return _Compiler(flow, config).compile()


def logical_topics(flow: StreamFlow[Any, Any]) -> tuple[str, ...]:
    """Every logical topic ``flow`` declares (source, outputs, routes, errors).

    The compiler's own walk, run without bindings: the environment contract
    (``loom env``) is derived from the same rules that check a deployment.
    """
    compiler = _Compiler(flow, ConfigContext())
    with contextlib.suppress(FlowValidationError):
        compiler.compile()
    return tuple(compiler.declared_topics)


def unused_bindings(flow: StreamFlow[Any, Any], topics: Mapping[str, str]) -> list[str]:
    """Bindings in ``topics`` for logical topics ``flow`` does not declare, one line each.

    :func:`compile_flow` accepts them (one config file may serve several
    flows); a service, whose environment belongs to one flow, refuses them:
    ``LOOM_TOPICS__INPUTT`` is a typo, not a setting to ignore.
    """
    declared = logical_topics(flow)
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
