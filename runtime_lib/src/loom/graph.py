"""Draw a :class:`~loom.streaming.StreamFlow` as a Mermaid flowchart.

``mermaid(flow)`` compiles the flow with every topic and sink counted as
bound (nothing is connected) and returns the text of a ``flowchart``: the
source topic, every step in order, router branches with their predicates,
every terminal, and the error routes: which nodes can fail with which
:class:`ErrorKind` (from each node's compiled plan) and the terminal each
kind is routed to. Each node is drawn as its node type specifies
(:mod:`loom.streaming.nodetypes`). ``loom graph module:attr`` prints it, and
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
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from loom.streaming.compiler import compile_unbound
from loom.streaming.errors import ErrorKind, FlowValidationError
from loom.streaming.nodes import FromTopic, Process, Router, StreamFlow, display_name
from loom.streaming.nodetypes import topic_detail
from loom.streaming.plan import BranchPlan, RouterPlan
from loom.streaming.registry import Drawing, node_type_of

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

_ALL_KINDS = tuple(ErrorKind)


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


class _Drawing:
    """Walks a declaration and its compiled plan side by side.

    Each node is drawn as its node type says (:mod:`loom.streaming.nodetypes`);
    the kinds of error it can raise come from its plan node, so the diagram
    shows what the compiled flow does.
    """

    def __init__(self) -> None:
        self.nodes: list[str] = []
        self.edges: list[str] = []
        self.failures: dict[str, list[ErrorKind]] = {}
        self.count = 0

    def node(self, drawing: Drawing) -> str:
        node_id = f"n{self.count}"
        self.count += 1
        opening, closing = drawing.shape
        self.nodes.append(f"    {node_id}{opening}{_label(*drawing.lines)}{closing}")
        return node_id

    def edge(self, source: str, target: str, label: str | None = None) -> None:
        arrow = f' -- "{_escape(label)}" --> ' if label else " --> "
        self.edges.append(f"    {source}{arrow}{target}")

    def can_fail(self, node_id: str, kinds: tuple[ErrorKind, ...]) -> None:
        if kinds:
            self.failures.setdefault(node_id, []).extend(kinds)

    def chain(
        self, nodes: tuple[Any, ...], branch: BranchPlan, previous: str, label: str | None = None
    ) -> None:
        """Draw ``nodes`` (compiled to ``branch``) after ``previous``; the first edge
        carries ``label``."""
        plans = [*branch.steps, branch.end]
        for node, plan in zip(nodes, plans, strict=True):
            spec = node_type_of(node)
            assert spec is not None  # the flow compiled
            current = self.node(spec.draw(node))
            self.edge(previous, current, label)
            self.can_fail(current, spec.error_kinds(plan))
            if isinstance(plan, RouterPlan):
                self.routes(node, plan, current)
            previous, label = current, None

    def routes(self, node: Router, plan: RouterPlan, router_id: str) -> None:
        for route, route_plan in zip(node.routes, plan.routes, strict=True):
            self.target(route.to, route_plan.branch, router_id, f"when {display_name(route.when)}")
        if node.default is not None and plan.default is not None:
            self.target(node.default, plan.default, router_id, "default")

    def target(self, target: Any, branch: BranchPlan, router_id: str, label: str) -> None:
        nodes = target.nodes if isinstance(target, Process) else (target,)
        self.chain(nodes, branch, router_id, label)


def mermaid(flow: StreamFlow[Any, Any], *, direction: str = "LR") -> str:
    """The Mermaid ``flowchart`` of ``flow`` (topic names are the logical ones).

    :raises FlowValidationError: if ``flow`` does not compile (bindings aside).
    """
    plan = compile_unbound(flow)
    drawing = _Drawing()
    source: FromTopic[Any] = flow.source
    source_id = drawing.node(
        Drawing(
            ("[(", ")]"),
            (f"FromTopic: {source.topic}", topic_detail(source.payload, source.codec)),
        )
    )
    drawing.can_fail(source_id, (ErrorKind.WIRE,))
    nodes = tuple(flow.process.nodes)
    if flow.output is not None:
        nodes += (flow.output,)
    drawing.chain(nodes, plan.root, source_id)

    failures = dict(drawing.failures)
    error_routes = []
    for terminal, kinds in _error_routes(flow.errors):
        spec = node_type_of(terminal)
        assert spec is not None  # the flow compiled
        error_routes.append((drawing.node(spec.draw(terminal)), kinds))
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


def problems(flow: StreamFlow[Any, Any]) -> tuple[str, ...]:
    """What :func:`~loom.streaming.compile_flow` rejects in ``flow``, bindings aside.

    Every logical topic and sink the flow names counts as bound, since topic
    and sink bindings belong to the deployment, not to the declaration.
    """
    try:
        compile_unbound(flow)
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
