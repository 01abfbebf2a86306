"""Draw a :class:`~loom.streaming.StreamFlow` as a Mermaid flowchart.

``mermaid(flow)`` walks the declaration (nothing is compiled, imported or
connected) and returns the text of a ``flowchart``: the source topic, every
step in order, router branches with their predicates, every terminal, and the
error routes: which nodes can fail with which :class:`ErrorKind` and the
terminal each kind is routed to. ``loom graph module:attr`` prints it, and
``--readme README.md`` keeps a README's embedded diagram in sync::

    <!-- loom-graph:start -->
    ```mermaid
    ...
    ```
    <!-- loom-graph:end -->
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from loom.config.context import ConfigContext
from loom.streaming.compiler import compile_flow
from loom.streaming.errors import ErrorKind, FlowValidationError
from loom.streaming.nodes import (
    BatchStep,
    CollectBatch,
    Drain,
    ExpandStep,
    FromTopic,
    IntoSink,
    IntoTopic,
    Process,
    RecordStep,
    Router,
    StreamFlow,
    WithAsync,
    display_name,
)

__all__ = [
    "MARKER_END",
    "MARKER_START",
    "add_command",
    "embed",
    "fenced",
    "load_flow",
    "mermaid",
    "problems",
]

MARKER_START = "<!-- loom-graph:start -->"
MARKER_END = "<!-- loom-graph:end -->"

_STEP_FAILURES = (ErrorKind.TASK, ErrorKind.BUSINESS)
_ALL_KINDS = tuple(ErrorKind)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return re.sub(r"\b[\w.]+\.(\w+)", r"\1", repr(tp))


def _escape(text: str) -> str:
    """Mermaid-safe label text (entity codes for quotes and angle brackets)."""
    return (
        text.replace("&", "#amp;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
    )


def _label(*lines: str) -> str:
    return '"' + "<br/>".join(_escape(line) for line in lines if line) + '"'


def _kinds(kinds: tuple[ErrorKind, ...]) -> str:
    if set(kinds) == set(_ALL_KINDS):
        return "any error"
    return ", ".join(kind.name for kind in kinds)


def _topic_detail(payload: Any, codec: str) -> str:
    return f"{_type_name(payload)} ({codec})" if payload is not None else codec


class _Drawing:
    def __init__(self) -> None:
        self.nodes: list[str] = []
        self.edges: list[str] = []
        self.failures: dict[str, list[ErrorKind]] = {}
        self.count = 0

    def node(self, shape: tuple[str, str], label: str) -> str:
        node_id = f"n{self.count}"
        self.count += 1
        self.nodes.append(f"    {node_id}{shape[0]}{label}{shape[1]}")
        return node_id

    def edge(self, source: str, target: str, label: str | None = None) -> None:
        arrow = f' -- "{_escape(label)}" --> ' if label else " --> "
        self.edges.append(f"    {source}{arrow}{target}")

    def can_fail(self, node_id: str, *kinds: ErrorKind) -> None:
        self.failures.setdefault(node_id, []).extend(kinds)

    # -- nodes ------------------------------------------------------------

    def terminal(self, node: Any, *, routes_errors: bool = True) -> str:
        """A terminal node; ``routes_errors=False`` for the error routes' own terminals."""
        if isinstance(node, IntoTopic):
            detail = _topic_detail(node.payload, node.codec)
            node_id = self.node(("[(", ")]"), _label(f"IntoTopic: {node.topic}", detail))
            if routes_errors:
                self.can_fail(node_id, ErrorKind.TASK, ErrorKind.DELIVERY)
            return node_id
        if isinstance(node, IntoSink):
            node_id = self.node(("[/", "/]"), _label(f"IntoSink: {node.sink}"))
            if routes_errors:
                self.can_fail(node_id, ErrorKind.DELIVERY)
            return node_id
        if isinstance(node, Drain):
            return self.node(("((", "))"), _label(f"Drain: {node.name}" if node.name else "Drain"))
        return self.node(("[", "]"), _label(f"not a terminal: {type(node).__name__}"))

    def step(self, node: Any) -> str:
        if isinstance(node, RecordStep | ExpandStep | BatchStep):
            kind = type(node).__name__
            node_id = self.node(("[", "]"), _label(f"{kind}: {node.name or display_name(node.fn)}"))
            self.can_fail(node_id, *_STEP_FAILURES)
            return node_id
        if isinstance(node, WithAsync):
            inner = node.fn
            fn = inner.fn if isinstance(inner, RecordStep | ExpandStep | BatchStep) else inner
            name = node.name or getattr(inner, "name", None) or display_name(fn)
            limits = f"max_concurrency {node.max_concurrency}"
            if node.timeout_ms is not None:
                limits += f", timeout {node.timeout_ms} ms"
            node_id = self.node(("([", "])"), _label(f"WithAsync: {name}", limits))
            self.can_fail(node_id, *_STEP_FAILURES)
            if node.timeout_ms is not None:
                self.can_fail(node_id, ErrorKind.TIMEOUT)
            return node_id
        if isinstance(node, CollectBatch):
            return self.node(
                ("[[", "]]"),
                _label(
                    f"CollectBatch: {node.name}" if node.name else "CollectBatch",
                    f"max {node.max_records} records, {node.timeout_ms} ms",
                ),
            )
        return self.node(("[", "]"), _label(f"not a step: {type(node).__name__}"))

    def chain(self, nodes: tuple[Any, ...], previous: str, label: str | None = None) -> None:
        """Draw ``nodes`` after ``previous``; the first edge carries ``label``."""
        for node in nodes:
            if isinstance(node, Router):
                current = self.node(
                    ("{", "}"), _label(f"Router: {node.name}" if node.name else "Router")
                )
                self.edge(previous, current, label)
                self.routes(node, current)
            else:
                if isinstance(node, IntoTopic | IntoSink | Drain):
                    current = self.terminal(node)
                else:
                    current = self.step(node)
                self.edge(previous, current, label)
            previous, label = current, None

    def routes(self, node: Router, router_id: str) -> None:
        self.can_fail(router_id, *_STEP_FAILURES)
        for route in node.routes:
            self.target(route.to, router_id, f"when {display_name(route.when)}")
        if node.default is not None:
            self.target(node.default, router_id, "default")
        else:
            self.can_fail(router_id, ErrorKind.ROUTING)

    def target(self, target: Any, router_id: str, label: str) -> None:
        nodes = target.nodes if isinstance(target, Process) else (target,)
        self.chain(nodes, router_id, label)


def mermaid(flow: StreamFlow[Any, Any], *, direction: str = "LR") -> str:
    """The Mermaid ``flowchart`` of ``flow`` (topic names are the logical ones)."""
    drawing = _Drawing()
    source: FromTopic[Any] = flow.source
    source_id = drawing.node(
        ("[(", ")]"),
        _label(f"FromTopic: {source.topic}", _topic_detail(source.payload, source.codec)),
    )
    drawing.can_fail(source_id, ErrorKind.WIRE)
    nodes = tuple(flow.process.nodes)
    if flow.output is not None:
        nodes += (flow.output,)
    drawing.chain(nodes, source_id)

    failures = dict(drawing.failures)
    error_routes = [
        (drawing.terminal(terminal, routes_errors=False), kinds)
        for terminal, kinds in _error_routes(flow.errors)
    ]
    title = " ".join(str(flow.name).split())
    lines = [f"flowchart {direction}", f"    %% flow: {title}"]
    lines += drawing.nodes
    lines += drawing.edges
    if failures or error_routes:
        hub = "errors"
        lines.append(f"    {hub}>{_label('errors')}]")
        for node_id, raised in failures.items():
            ordered = tuple(kind for kind in ErrorKind if kind in raised)
            lines.append(f'    {node_id} -. "{_kinds(ordered)}" .-> {hub}')
        for error_id, routed in error_routes:
            lines.append(f'    {hub} -- "{_kinds(routed)}" --> {error_id}')
    return "\n".join(lines) + "\n"


def _error_routes(errors: Any) -> list[tuple[Any, tuple[ErrorKind, ...]]]:
    """(terminal, kinds) pairs, one per distinct terminal, in declaration order."""
    if errors is None:
        return []
    if not isinstance(errors, Mapping):
        return [(errors, _ALL_KINDS)]
    grouped: dict[int, tuple[Any, list[ErrorKind]]] = {}
    for key, terminal in errors.items():
        kinds = key if isinstance(key, tuple) else (key,)
        grouped.setdefault(id(terminal), (terminal, []))[1].extend(kinds)
    return [
        (terminal, tuple(kind for kind in ErrorKind if kind in kinds))
        for terminal, kinds in grouped.values()
    ]


def fenced(diagram: str) -> str:
    """``diagram`` as a Markdown ``mermaid`` code block."""
    return f"```mermaid\n{diagram}```\n"


def embed(document: str, diagram: str) -> str:
    """Replace the block between the loom-graph markers of ``document``."""
    start = document.find(MARKER_START)
    end = document.find(MARKER_END)
    if start < 0 or end < start:
        raise ValueError(f"no {MARKER_START} ... {MARKER_END} block to replace")
    head = document[: start + len(MARKER_START)]
    return f"{head}\n{fenced(diagram)}{document[end:]}"


def load_flow(target: str) -> StreamFlow[Any, Any]:
    """Import ``module:attr`` and return the flow it names.

    The current directory is importable (as with ``python -m``); ``attr`` may
    be dotted, and may name a function without arguments that returns the flow.
    """
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected module:attribute, got {target!r}")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, StreamFlow):
        obj = obj()
    if not isinstance(obj, StreamFlow):
        raise TypeError(f"{target} is not a StreamFlow (got {type(obj).__name__})")
    return obj


def _declared_names(flow: StreamFlow[Any, Any]) -> tuple[set[str], set[str]]:
    """The logical topics and the sink names a flow declares, anywhere in it."""
    topics: set[str] = set()
    sinks: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, FromTopic | IntoTopic) and isinstance(node.topic, str):
            topics.add(node.topic)
        elif isinstance(node, IntoSink) and isinstance(node.sink, str):
            sinks.add(node.sink)
        elif isinstance(node, Process):
            for child in node.nodes:
                visit(child)
        elif isinstance(node, Router):
            for route in node.routes:
                visit(route.to)
            visit(node.default)

    visit(flow.source)
    visit(flow.process)
    visit(flow.output)
    errors = flow.errors
    for terminal in errors.values() if isinstance(errors, Mapping) else (errors,):
        visit(terminal)
    return topics, sinks


def problems(flow: StreamFlow[Any, Any]) -> tuple[str, ...]:
    """What :func:`~loom.streaming.compile_flow` rejects in ``flow``, bindings aside.

    Every logical topic and sink the flow names counts as bound, since topic
    and sink bindings belong to the deployment, not to the declaration.
    """
    topics, sinks = _declared_names(flow)
    config = ConfigContext.from_dict(
        {
            "topics": {topic: topic for topic in topics},
            "streaming": {"sinks": {sink: {"type": "any"} for sink in sinks}},
        }
    )
    try:
        compile_flow(flow, config)
    except FlowValidationError as exc:
        return exc.problems
    return ()


def _command(args: argparse.Namespace) -> int:
    try:
        flow = load_flow(args.target)
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        print(f"loom graph: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the user's module failed while importing
        print(
            f"loom graph: importing {args.target} failed: {type(exc).__name__}: {exc}",
            file=sys.stderr,
        )
        return 2
    found = problems(flow)
    if found:
        count = f"{len(found)} problem{'s' if len(found) != 1 else ''}"
        print(f"loom graph: {args.target} is not a valid flow ({count}):", file=sys.stderr)
        for problem in found:
            print(f"  - {' '.join(problem.split())}", file=sys.stderr)
        return 2
    diagram = mermaid(flow, direction=args.direction)
    if args.readme is None:
        sys.stdout.write(fenced(diagram) if args.markdown else diagram)
        return 0
    path = Path(args.readme)
    current = path.read_text(encoding="utf-8")
    try:
        updated = embed(current, diagram)
    except ValueError as exc:
        print(f"loom graph: {path}: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if updated != current:
            print(
                f"loom graph: {path} shows an outdated diagram of {args.target}; "
                f"run: loom graph {args.target} --readme {path}",
                file=sys.stderr,
            )
            return 1
        return 0
    if updated != current:
        path.write_text(updated, encoding="utf-8")
    return 0


def add_command(commands: Any) -> None:
    """Register ``loom graph`` on the ``loom`` command's subparsers."""
    parser = commands.add_parser(
        "graph",
        help="print a flow as a Mermaid diagram",
        description=(
            "Print the Mermaid flowchart of a StreamFlow (module:attribute), after checking "
            "it as compile_flow does (topic and sink bindings aside). Exit status: 0 done, "
            "1 with --check: the diagram in the README is outdated, 2 the target does not "
            "import or is not a valid flow (one line per problem)."
        ),
    )
    parser.add_argument(
        "target",
        metavar="MODULE:ATTR",
        help="the flow, or a function without arguments returning it, "
        "e.g. orders_enricher.flow:flow",
    )
    parser.add_argument(
        "--direction",
        default="LR",
        choices=("LR", "TD", "RL", "BT"),
        help="direction of the flowchart (default: %(default)s)",
    )
    parser.add_argument(
        "--markdown", action="store_true", help="wrap the diagram in a Markdown mermaid code block"
    )
    parser.add_argument(
        "--readme",
        metavar="PATH",
        help=f"replace the diagram between {MARKER_START} and {MARKER_END} in PATH",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="with --readme: change nothing, exit 1 if the diagram there is outdated",
    )
    handler: Callable[[argparse.Namespace], int] = _command
    parser.set_defaults(handler=handler)
