"""A node type is specified once and dispatched exhaustively.

These tests add a toy node type, ``Scale``, exactly as docs/architecture.md
("Adding a node type") describes: a declaration, a plan class, a registered
:class:`NodeType` (compile rule, error kinds, drawing) and a registered
operator. Then they check what the guide promises: it compiles, runs, commits
and is drawn; a node type without an operator is refused before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from bytewax.dataflow import Stream

from loom.graph import mermaid
from loom.streaming import FlowValidationError, Process, RecordStep, compile_flow
from loom.streaming.bytewax.adapter import DataflowBuilder, register_operator
from loom.streaming.bytewax.records import Chunk
from loom.streaming.bytewax.runner import StreamingRunner
from loom.streaming.compiler import Compiler
from loom.streaming.compiler import Stream as RecordStream
from loom.streaming.registry import Drawing, NodeType, no_errors, register
from loom.streaming.testing import TestRunner
from tests.runtime.payloads import Order, enrich, enrich_flow, orders

# -- 1. the declaration: what a flow author writes ----------------------------


@dataclass(frozen=True)
class Scale:
    """Multiply each order's amount by ``factor``."""

    factor: float


# -- 2. the plan node: what the compiler hands the adapter --------------------


@dataclass(frozen=True)
class ScalePlan:
    node_id: str
    factor: float


# -- 3. the node type: compile rule, error kinds, drawing ---------------------


def compile_scale(
    compiler: Compiler, node: Scale, stream: RecordStream | None, where: str
) -> ScalePlan:
    assert stream is not None
    node_id = compiler.claim_id("scale")
    if node.factor <= 0:
        compiler.problem(f"Scale {node_id!r}: factor must be > 0, got {node.factor}")
    compiler.check_type(stream, Order, f"Scale {node_id!r}")
    return ScalePlan(node_id, node.factor)


def draw_scale(node: Scale) -> Drawing:
    return Drawing(("[", "]"), (f"Scale: x{node.factor:g}",))


register(NodeType(Scale, ScalePlan, "step", compile_scale, no_errors, draw_scale))


# -- 4. the operator: how the adapter runs the plan node ----------------------


class ScaleOp:
    def __init__(self, plan: ScalePlan) -> None:
        self.factor = plan.factor

    def __call__(self, chunk: Chunk) -> Chunk:
        for rec in chunk.records:
            rec.value = Order(rec.value.id, rec.value.amount * self.factor)
        return chunk


def run_scale(builder: DataflowBuilder, plan: ScalePlan, stream: Stream[Chunk]) -> Stream[Chunk]:
    return builder.map_step(plan.node_id, stream, ScaleOp(plan))


register_operator(ScalePlan, run_scale)


# -- what the guide promises --------------------------------------------------


def test_a_registered_node_type_compiles_runs_and_commits() -> None:
    tester = TestRunner(enrich_flow(Scale(2), RecordStep(enrich)))
    tester.send_all(orders(3, start=1))
    result = tester.run()
    assert sorted(value["amount"] for value in result.values("output")) == [2.0, 4.0, 6.0]
    assert result.committed("input") == {0: 3}


def test_a_registered_node_type_reports_its_problems_at_compile_time() -> None:
    config = {"topics": {"input": "i", "output": "o", "dlq": "d"}}
    with pytest.raises(FlowValidationError, match="factor must be > 0, got 0"):
        compile_flow(enrich_flow(Scale(0), RecordStep(enrich)), config)


def test_loom_graph_draws_a_registered_node_type_as_it_specifies() -> None:
    assert '["Scale: x2"]' in mermaid(enrich_flow(Scale(2), RecordStep(enrich)))


@dataclass(frozen=True)
class Unrunnable:
    """A node type registered without an operator."""


@dataclass(frozen=True)
class UnrunnablePlan:
    node_id: str


def compile_unrunnable(
    compiler: Compiler, node: Unrunnable, stream: RecordStream | None, where: str
) -> UnrunnablePlan:
    return UnrunnablePlan(compiler.claim_id("unrunnable"))


register(
    NodeType(
        Unrunnable,
        UnrunnablePlan,
        "step",
        compile_unrunnable,
        no_errors,
        lambda node: Drawing(("[", "]"), ("Unrunnable",)),
    )
)


def test_a_node_type_without_an_operator_is_refused_before_anything_runs() -> None:
    flow = enrich_flow(Unrunnable(), RecordStep(enrich))
    config: dict[str, Any] = {"topics": {"input": "i", "output": "o", "dlq": "d"}}
    with pytest.raises(FlowValidationError) as refused:
        StreamingRunner.from_dict(flow, config)
    assert refused.value.problems == (
        "UnrunnablePlan: no Bytewax operator is registered for it "
        "(loom.streaming.bytewax.adapter.register_operator)",
    )


def test_an_unregistered_node_is_a_compile_problem_not_a_fallback() -> None:
    class Unknown:
        pass

    flow = enrich_flow()
    flow = type(flow)(
        flow.name,
        source=flow.source,
        process=Process(Unknown(), RecordStep(enrich)),  # type: ignore[arg-type]
        output=flow.output,
        errors=flow.errors,
    )
    with pytest.raises(FlowValidationError, match="is not a flow node"):
        compile_flow(flow, {"topics": {"input": "i", "output": "o", "dlq": "d"}})


def test_registering_a_node_type_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="registered already"):
        register(NodeType(Scale, ScalePlan, "step", compile_scale, no_errors, draw_scale))
