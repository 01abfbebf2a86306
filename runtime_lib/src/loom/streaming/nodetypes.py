"""The built-in node types, each specified once: compile rule, error kinds, drawing.

Every block below registers one :class:`~loom.streaming.registry.NodeType`.
The compiler (:mod:`loom.streaming.compiler`) dispatches to the compile
rules, ``loom graph`` draws nodes and their error edges from them, and the
Bytewax adapter runs each plan class with the operator it registered for it.
``docs/architecture.md`` ("Adding a node type") shows the steps for a new one.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from loom.streaming.compiler import UNKNOWN, Compiler, Stream
from loom.streaming.errors import BusinessError, ErrorKind
from loom.streaming.nodes import (
    BatchStep,
    CollectBatch,
    Drain,
    ExpandStep,
    IntoSink,
    IntoTopic,
    RecordStep,
    Retry,
    Router,
    StatefulStep,
    WindowAggregate,
    WithAsync,
    display_name,
)
from loom.streaming.plan import (
    AsyncPlan,
    CollectPlan,
    DrainPlan,
    NamedSinkPlan,
    RetryPlan,
    RoutePlan,
    RouterPlan,
    StatefulPlan,
    StepKind,
    StepPlan,
    TopicSinkPlan,
    WindowPlan,
)
from loom.streaming.registry import Drawing, NodeType, no_errors, register
from loom.streaming.windows import Hopping, Session, Tumbling

STEP_FAILURES = (ErrorKind.TASK, ErrorKind.BUSINESS)
"""What any user function can raise: an exception (``TASK``) or a ``BusinessError``."""

_STEP_KINDS: dict[type, StepKind] = {RecordStep: "record", ExpandStep: "expand", BatchStep: "batch"}


def type_name(tp: Any) -> str:
    """A payload type's short name for diagrams (``Order``, ``list[Order]``)."""
    if isinstance(tp, type):
        return tp.__name__
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", repr(tp))


def topic_detail(payload: Any, codec: str) -> str:
    """``Order (json)``, or just the codec when the payload type is not declared."""
    return f"{type_name(payload)} ({codec})" if payload is not None else codec


# -- Retry: a step's policy for calling again after a failure ----------------


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def compile_retry(compiler: Compiler, retry: Any, where: str) -> RetryPlan | None:
    """Check a step's ``retry`` and return its plan (``None``: no retry, or invalid)."""
    if retry is None:
        return None
    if not isinstance(retry, Retry):
        compiler.problem(f"{where}: retry must be a Retry(...), got {retry!r}")
        return None
    valid = True
    if not _is_count(retry.attempts) or retry.attempts < 1:
        compiler.problem(f"{where}: Retry attempts must be an int >= 1, got {retry.attempts!r}")
        valid = False
    if not _is_count(retry.backoff_ms) or retry.backoff_ms < 0:
        compiler.problem(f"{where}: Retry backoff_ms must be an int >= 0, got {retry.backoff_ms!r}")
        valid = False
    cap = retry.max_backoff_ms
    if cap is not None and (
        not _is_count(cap) or (_is_count(retry.backoff_ms) and cap < retry.backoff_ms)
    ):
        compiler.problem(
            f"{where}: Retry max_backoff_ms must be None or an int >= backoff_ms "
            f"({retry.backoff_ms!r}), got {cap!r}"
        )
        valid = False
    on = retry.on
    if not isinstance(on, tuple) or not all(
        isinstance(cls, type) and issubclass(cls, Exception) for cls in on
    ):
        compiler.problem(
            f"{where}: Retry on must be a tuple of Exception classes (empty: any "
            f"Exception), got {on!r}"
        )
        valid = False
    if not valid or retry.attempts == 1:
        return None  # one call in all is no retry: the step runs its plain operator
    business = tuple(cls for cls in on if issubclass(cls, BusinessError))
    return RetryPlan(retry.attempts, retry.backoff_ms, cap, on, business)


def retry_line(retry: Retry) -> str:
    """The label line of a step with ``retry``: ``retry 3, backoff 10 ms (max 80)``."""
    line = f"retry {retry.attempts}, backoff {retry.backoff_ms} ms"
    return line if retry.max_backoff_ms is None else f"{line} (max {retry.max_backoff_ms})"


# -- RecordStep, ExpandStep, BatchStep: a synchronous function ----------------


def _compile_step(
    compiler: Compiler, node: RecordStep | ExpandStep | BatchStep, stream: Stream | None, _: str
) -> StepPlan | None:
    assert stream is not None
    kind = _STEP_KINDS[type(node)]
    node_id = compiler.claim_id(node.name or display_name(node.fn))
    where = f"{type(node).__name__} {node_id!r}"
    retry = compile_retry(compiler, node.retry, where)
    sig = compiler.signature(node.fn, where)
    compiler.check_batching(kind, stream, where)
    if sig is None:
        return None
    if sig.is_async:
        compiler.problem(
            f"{where}: {display_name(node.fn)} is async; wrap the step in WithAsync(...)"
        )
    compiler.check_type(stream, sig.accepts, where)
    compiler.advance(stream, kind, sig.returns)
    return StepPlan(node_id, kind, node.fn, sig.takes_message, retry)


def _draw_step(node: RecordStep | ExpandStep | BatchStep) -> Drawing:
    lines: tuple[str, ...] = (f"{type(node).__name__}: {node.name or display_name(node.fn)}",)
    if isinstance(node.retry, Retry):
        lines += (retry_line(node.retry),)
    return Drawing(("[", "]"), lines)


def _step_failures(plan: Any) -> tuple[ErrorKind, ...]:
    return STEP_FAILURES


for _declaration in _STEP_KINDS:
    register(NodeType(_declaration, StepPlan, "step", _compile_step, _step_failures, _draw_step))


# -- WithAsync: an async function with bounded concurrency --------------------


def _async_function(node: WithAsync) -> Any:
    inner = node.fn
    return inner.fn if isinstance(inner, RecordStep | ExpandStep | BatchStep) else inner


def _async_name(node: WithAsync) -> str:
    return node.name or getattr(node.fn, "name", None) or display_name(_async_function(node))


def _compile_async(
    compiler: Compiler, node: WithAsync, stream: Stream | None, _: str
) -> AsyncPlan | None:
    assert stream is not None
    fn = _async_function(node)
    kind: StepKind = _STEP_KINDS.get(type(node.fn), "batch" if stream.batched else "record")
    node_id = compiler.claim_id(_async_name(node))
    where = f"WithAsync {node_id!r}"
    if node.max_concurrency < 1:
        compiler.problem(f"{where}: max_concurrency must be >= 1, got {node.max_concurrency}")
    if node.timeout_ms is not None and node.timeout_ms < 1:
        compiler.problem(f"{where}: timeout_ms must be >= 1 or None, got {node.timeout_ms}")
    inner_retry = getattr(node.fn, "retry", None)
    if node.retry is not None and inner_retry is not None:
        compiler.problem(f"{where}: retry is set on WithAsync and on the step it wraps; keep one")
    retry = compile_retry(compiler, _async_retry(node), where)
    compiler.check_batching(kind, stream, where)
    sig = compiler.signature(fn, where)
    if sig is None:
        return None
    if not sig.is_async:
        compiler.problem(f"{where}: {display_name(fn)} is not an async function (use RecordStep)")
    compiler.check_type(stream, sig.accepts, where)
    compiler.advance(stream, kind, sig.returns)
    return AsyncPlan(
        node_id, kind, fn, sig.takes_message, node.max_concurrency, node.timeout_ms, retry
    )


def _async_retry(node: WithAsync) -> Any:
    """The node's retry: its own, or that of the step it wraps."""
    return node.retry if node.retry is not None else getattr(node.fn, "retry", None)


def _async_failures(plan: AsyncPlan) -> tuple[ErrorKind, ...]:
    return (*STEP_FAILURES, ErrorKind.TIMEOUT) if plan.timeout_ms is not None else STEP_FAILURES


def _draw_async(node: WithAsync) -> Drawing:
    limits = f"max_concurrency {node.max_concurrency}"
    if node.timeout_ms is not None:
        limits += f", timeout {node.timeout_ms} ms"
    lines: tuple[str, ...] = (f"WithAsync: {_async_name(node)}", limits)
    retry = _async_retry(node)
    if isinstance(retry, Retry):
        lines += (retry_line(retry),)
    return Drawing(("([", "])"), lines)


register(NodeType(WithAsync, AsyncPlan, "step", _compile_async, _async_failures, _draw_async))


# -- CollectBatch: group records for a batch step -----------------------------


def _compile_collect(
    compiler: Compiler, node: CollectBatch, stream: Stream | None, _: str
) -> CollectPlan:
    assert stream is not None
    node_id = compiler.claim_id(node.name or "collect_batch")
    where = f"CollectBatch {node_id!r}"
    if node.max_records < 1:
        compiler.problem(f"{where}: max_records must be >= 1, got {node.max_records}")
    if node.timeout_ms < 1:
        compiler.problem(f"{where}: timeout_ms must be >= 1, got {node.timeout_ms}")
    if stream.batched:
        compiler.problem(f"{where}: follows another CollectBatch")
    stream.batched = stream.from_batches = True
    return CollectPlan(node_id, node.max_records, node.timeout_ms)


def _draw_collect(node: CollectBatch) -> Drawing:
    name = f"CollectBatch: {node.name}" if node.name else "CollectBatch"
    return Drawing(("[[", "]]"), (name, f"max {node.max_records} records, {node.timeout_ms} ms"))


register(NodeType(CollectBatch, CollectPlan, "step", _compile_collect, no_errors, _draw_collect))


# -- IntoTopic: produce to a topic --------------------------------------------


def _compile_into_topic(
    compiler: Compiler, node: IntoTopic[Any], stream: Stream | None, where: str
) -> TopicSinkPlan | None:
    node_id = compiler.claim_id(f"into_{node.topic}")
    binding = compiler.bind(f"IntoTopic {node.topic!r} ({where})", node)
    if stream is not None:
        compiler.check_type(stream, node.payload, f"IntoTopic {node.topic!r}")
    return TopicSinkPlan(node_id, binding) if binding else None


def _into_topic_failures(plan: TopicSinkPlan) -> tuple[ErrorKind, ...]:
    # TASK: a record the codec cannot encode (or of another type than the
    # declared payload); DELIVERY: the broker refused it for good.
    return (ErrorKind.TASK, ErrorKind.DELIVERY)


def _draw_into_topic(node: IntoTopic[Any]) -> Drawing:
    lines = (f"IntoTopic: {node.topic}", topic_detail(node.payload, node.codec))
    return Drawing(("[(", ")]"), lines)


register(
    NodeType(
        IntoTopic,
        TopicSinkPlan,
        "terminal",
        _compile_into_topic,
        _into_topic_failures,
        _draw_into_topic,
    )
)


# -- IntoSink: a sink registered with the runner ------------------------------


def _compile_into_sink(
    compiler: Compiler, node: IntoSink, stream: Stream | None, where: str
) -> NamedSinkPlan | None:
    node_id = compiler.claim_id(f"sink_{node.sink}")
    compiler.declared_sinks[node.sink] = None
    settings = compiler.config.streaming.sinks.get(node.sink)
    if settings is None:
        compiler.problem(
            f"IntoSink {node.sink!r} ({where}): no sink named {node.sink!r} "
            "under streaming.sinks in the config"
        )
        return None
    return NamedSinkPlan(node_id, node.sink, settings.type, dict(settings.options))


def _draw_into_sink(node: IntoSink) -> Drawing:
    return Drawing(("[/", "/]"), (f"IntoSink: {node.sink}",))


# A sink whose write fails stops the run (nothing after it is committed): it
# raises no error kind that could be routed.
register(
    NodeType(IntoSink, NamedSinkPlan, "terminal", _compile_into_sink, no_errors, _draw_into_sink)
)


# -- Drain: a deliberate discard ----------------------------------------------


def _compile_drain(compiler: Compiler, node: Drain, stream: Stream | None, _: str) -> DrainPlan:
    return DrainPlan(compiler.claim_id(node.name or "drain"))


def _draw_drain(node: Drain) -> Drawing:
    return Drawing(("((", "))"), (f"Drain: {node.name}" if node.name else "Drain",))


register(NodeType(Drain, DrainPlan, "terminal", _compile_drain, no_errors, _draw_drain))


# -- Router: the first matching route, or the default -------------------------


def _compile_router(
    compiler: Compiler, node: Router, stream: Stream | None, where: str
) -> RouterPlan | None:
    assert stream is not None
    node_id = compiler.claim_id(node.name or "router")
    if not node.routes and node.default is None:
        compiler.problem(f"Router {node_id!r}: has no routes")
    routes: list[RoutePlan] = []
    for index, route in enumerate(node.routes):
        route_where = f"route {index} of Router {node_id!r}"
        if not callable(route.when):
            compiler.problem(f"{route_where}: when={route.when!r} is not callable")
        branch = compiler.route_target(route.to, stream, route_where)
        if branch is not None and callable(route.when):
            routes.append(RoutePlan(route.when, branch))
    default = None
    if node.default is not None:
        default = compiler.route_target(node.default, stream, f"default of Router {node_id!r}")
    if len(routes) != len(node.routes):
        return None
    return RouterPlan(node_id, tuple(routes), default)


def _router_failures(plan: RouterPlan) -> tuple[ErrorKind, ...]:
    # A predicate can raise; without a default, an unmatched record is ROUTING.
    return STEP_FAILURES if plan.default is not None else (*STEP_FAILURES, ErrorKind.ROUTING)


def _draw_router(node: Router) -> Drawing:
    return Drawing(("{", "}"), (f"Router: {node.name}" if node.name else "Router",))


register(NodeType(Router, RouterPlan, "router", _compile_router, _router_failures, _draw_router))


# -- StatefulStep, WindowAggregate: state per key -----------------------------


STATE_SHAPE = ("[/", "\\]")
"""Stateful nodes are trapezoids in ``loom graph`` (not hexagons: ``{{`` would be
a Jinja expression in a generated README's template)."""


def _check_stateful(compiler: Compiler, stream: Stream, node_id: str, where: str) -> None:
    """Checks every stateful node shares: where it may stand, its key."""
    compiler.check_batching("record", stream, where)
    if stream.from_batches:
        compiler.problem(
            f"{where}: comes after a CollectBatch; batch results have no single input "
            "record, so replays after a crash could not be recognised"
        )
    if stream.stateful is not None:
        compiler.problem(
            f"{where}: comes after the stateful node {stream.stateful!r}; one stateful node "
            "per path (write the first one's results to a topic and read them in another flow)"
        )
    stream.stateful = node_id


def _check_callable(compiler: Compiler, value: Any, name: str, where: str) -> None:
    if value is not None and not callable(value):
        compiler.problem(f"{where}: {name} must be a function of the payload, got {value!r}")


def _is_positive(value: Any) -> bool:
    return _is_count(value) and value >= 1


def _compile_stateful(
    compiler: Compiler, node: StatefulStep, stream: Stream | None, _: str
) -> StatefulPlan | None:
    assert stream is not None
    node_id = compiler.claim_id(node.name or display_name(node.fn))
    where = f"StatefulStep {node_id!r}"
    _check_stateful(compiler, stream, node_id, where)
    _check_callable(compiler, node.key, "key", where)
    if node.ttl_ms is not None and not _is_positive(node.ttl_ms):
        compiler.problem(f"{where}: ttl_ms must be None or an int >= 1, got {node.ttl_ms!r}")
    stream.payload = UNKNOWN
    if not callable(node.fn):
        compiler.problem(f"{where}: {node.fn!r} is not callable")
        return None
    if inspect.iscoroutinefunction(node.fn):
        compiler.problem(f"{where}: {display_name(node.fn)} is async; state steps are synchronous")
    return StatefulPlan(node_id, node.fn, node.key, node.ttl_ms)


def _key_line(key: Any) -> str:
    return "key: record key" if key is None else f"key: {display_name(key)}"


def _draw_stateful(node: StatefulStep) -> Drawing:
    lines: tuple[str, ...] = (
        f"StatefulStep: {node.name or display_name(node.fn)}",
        _key_line(node.key),
    )
    if node.ttl_ms is not None:
        lines += (f"ttl {node.ttl_ms} ms",)
    return Drawing(STATE_SHAPE, lines)


register(
    NodeType(StatefulStep, StatefulPlan, "step", _compile_stateful, _step_failures, _draw_stateful)
)


def _window_problem(window: Any) -> str | None:
    """What is wrong with a window, or ``None``."""
    if isinstance(window, Tumbling):
        return None if _is_positive(window.size_ms) else "Tumbling size_ms must be an int >= 1"
    if isinstance(window, Hopping):
        if not (_is_positive(window.size_ms) and _is_positive(window.step_ms)):
            return "Hopping size_ms and step_ms must be ints >= 1"
        if window.size_ms % window.step_ms:
            return "Hopping size_ms must be a multiple of step_ms"
        return None
    if isinstance(window, Session):
        return None if _is_positive(window.gap_ms) else "Session gap_ms must be an int >= 1"
    return f"window must be Tumbling(...), Hopping(...) or Session(...), got {window!r}"


def _compile_window(
    compiler: Compiler, node: WindowAggregate, stream: Stream | None, _: str
) -> WindowPlan | None:
    assert stream is not None
    node_id = compiler.claim_id(node.name or f"window_{type(node.aggregate).__name__.lower()}")
    where = f"WindowAggregate {node_id!r}"
    _check_stateful(compiler, stream, node_id, where)
    _check_callable(compiler, node.key, "key", where)
    _check_callable(compiler, node.event_time, "event_time", where)
    valid = True
    if (problem := _window_problem(node.window)) is not None:
        compiler.problem(f"{where}: {problem}")
        valid = False
    needed = ("initial", "add", "result", *(("merge",) if isinstance(node.window, Session) else ()))
    missing = [name for name in needed if not callable(getattr(node.aggregate, name, None))]
    if missing:
        compiler.problem(
            f"{where}: aggregate {node.aggregate!r} has no {', '.join(missing)} method"
            + (" (session windows merge sessions)" if "merge" in missing else "")
        )
        valid = False
    if not _is_count(node.grace_ms) or node.grace_ms < 0:
        compiler.problem(f"{where}: grace_ms must be an int >= 0, got {node.grace_ms!r}")
        valid = False
    compiler.raised.add(ErrorKind.LATE)
    stream.payload = UNKNOWN
    if not valid:
        return None
    return WindowPlan(
        node_id, node.window, node.aggregate, node.key, node.event_time, node.grace_ms
    )


def _window_failures(plan: WindowPlan) -> tuple[ErrorKind, ...]:
    return (*STEP_FAILURES, ErrorKind.LATE)


def _window_line(window: Any, grace_ms: int) -> str:
    if isinstance(window, Tumbling):
        line = f"tumbling {window.size_ms} ms"
    elif isinstance(window, Hopping):
        line = f"hopping {window.size_ms} ms every {window.step_ms} ms"
    elif isinstance(window, Session):
        line = f"session, gap {window.gap_ms} ms"
    else:
        line = repr(window)
    return f"{line}, grace {grace_ms} ms" if grace_ms else line


def _draw_window(node: WindowAggregate) -> Drawing:
    title = f"WindowAggregate: {node.name}" if node.name else "WindowAggregate"
    lines = (title, _window_line(node.window, node.grace_ms), repr(node.aggregate))
    return Drawing(STATE_SHAPE, (*lines, _key_line(node.key)))


register(
    NodeType(WindowAggregate, WindowPlan, "step", _compile_window, _window_failures, _draw_window)
)
