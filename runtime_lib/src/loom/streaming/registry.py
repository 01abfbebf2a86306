"""The node-type registry: one :class:`NodeType` per kind of flow node.

A node type is specified once, by the :class:`NodeType` registered for its
declaration class: its compile rule (declaration to plan node), the error
kinds its plan node can raise, and how ``loom graph`` draws it. The Bytewax
adapter keeps the one other part, the operator that runs the plan node, in
its own registry keyed by the plan class, and refuses to import if a
registered node type has no operator (see
:mod:`loom.streaming.bytewax.adapter`). The built-in node types are
registered in :mod:`loom.streaming.nodetypes`; ``docs/architecture.md``
("Adding a node type") walks through adding one.

Dispatch is by exact declaration class, so an unregistered node is a compile
problem naming it, never a silent fallback to another node's behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from loom.streaming.errors import ErrorKind

if TYPE_CHECKING:
    from loom.streaming.compiler import Compiler, Stream

Role = Literal["step", "terminal", "router"]
"""Where a node may stand: in a chain, at its end (a sink), or ending it with branches."""

Shape = tuple[str, str]
"""Mermaid brackets around a node's label, e.g. ``("[(", ")]")`` for a topic."""


@dataclass(frozen=True)
class Drawing:
    """How ``loom graph`` draws a node: its shape and the lines of its label."""

    shape: Shape
    lines: tuple[str, ...]


@dataclass(frozen=True)
class NodeType:
    """Everything Loom's declaration layer knows about one kind of node.

    :param declaration: the node class a flow author writes (``RecordStep``).
    :param plan: the plan class ``compile`` returns (``StepPlan``); the
        adapter's operator registry is keyed by it.
    :param role: ``"step"``, ``"terminal"`` or ``"router"``.
    :param compile: ``compile(compiler, node, stream, where)`` checks ``node``
        against the records reaching it (``stream``), reports problems with
        ``compiler.problem(...)`` and returns the plan node (``None`` when it
        cannot be built). ``stream`` is ``None`` for a terminal of the error
        routes.
    :param error_kinds: the kinds of error the plan node can raise.
    :param draw: the node's :class:`Drawing`, from its declaration.
    """

    declaration: type
    plan: type
    role: Role
    compile: Callable[[Compiler, Any, Stream | None, str], Any]
    error_kinds: Callable[[Any], tuple[ErrorKind, ...]]
    draw: Callable[[Any], Drawing]


_REGISTRY: dict[type, NodeType] = {}


def register(node_type: NodeType) -> NodeType:
    """Make ``node_type`` known to the compiler, ``loom graph`` and the adapter."""
    if node_type.declaration in _REGISTRY:
        raise ValueError(f"a node type for {node_type.declaration.__name__} is registered already")
    _REGISTRY[node_type.declaration] = node_type
    return node_type


def node_type_of(node: Any) -> NodeType | None:
    """The node type of a declaration, or ``None`` if it is not a registered node."""
    return _REGISTRY.get(type(node))


def node_types() -> list[NodeType]:
    return list(_REGISTRY.values())


def no_errors(plan: Any) -> tuple[ErrorKind, ...]:
    """For node types that raise no error of their own."""
    return ()
