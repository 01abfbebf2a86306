"""compile_flow rejects an invalid flow before anything runs, listing every problem.

Each test declares one kind of mistake and checks that compiling raises ONE
FlowValidationError whose ``problems`` name it; the last tests check what a
valid flow compiles into and that compiling runs nothing.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from typing import Any

import pydantic
import pytest

from loom.config import ConfigContext
from loom.streaming import (
    BatchStep,
    CollectBatch,
    Count,
    Drain,
    ErrorKind,
    ExpandStep,
    FlowValidationError,
    FromTopic,
    IntoSink,
    IntoTopic,
    Process,
    RecordStep,
    Route,
    Router,
    StreamFlow,
    Tumbling,
    WindowAggregate,
    WithAsync,
    compile_flow,
)
from loom.streaming.plan import (
    AsyncPlan,
    BranchPlan,
    CollectPlan,
    DrainPlan,
    FlowPlan,
    NamedSinkPlan,
    RouterPlan,
    StepPlan,
    TopicSinkPlan,
)
from tests.runtime.payloads import Enriched, Order, enrich

CONFIG = ConfigContext.from_dict(
    {
        "topics": {"input": "orders.v1", "output": "enriched.v1", "dlq": "orders.dlq"},
        "streaming": {"sinks": {"audit": {"type": "AuditLogSink", "options": {"path": "/x"}}}},
    }
)

_DEFAULT: Any = object()


class Customer(pydantic.BaseModel):
    id: str


def flow(
    *nodes: Any,
    source: FromTopic[Any] | None = None,
    output: Any = _DEFAULT,
    errors: Any = _DEFAULT,
    name: str = "orders",
) -> StreamFlow[Any, Any]:
    """input (Order) -> nodes -> output, every error to dlq, unless overridden."""
    return StreamFlow(
        name,
        source=source or FromTopic("input", payload=Order),
        process=Process(*nodes),
        output=IntoTopic("output") if output is _DEFAULT else output,
        errors=IntoTopic("dlq") if errors is _DEFAULT else errors,
    )


def problems_of(declared: StreamFlow[Any, Any], config: ConfigContext = CONFIG) -> tuple[str, ...]:
    with pytest.raises(FlowValidationError) as excinfo:
        compile_flow(declared, config)
    assert excinfo.value.flow_name == declared.name
    return excinfo.value.problems


def only_problem(declared: StreamFlow[Any, Any], config: ConfigContext = CONFIG) -> str:
    problems = problems_of(declared, config)
    assert len(problems) == 1, problems
    return problems[0]


def describe(enriched: Enriched) -> Enriched:
    return enriched


async def lookup(enriched: Enriched) -> Enriched:
    return enriched


async def fetch(order: Order) -> Enriched:
    return enrich(order)


def dedupe(batch: list[Enriched]) -> list[Enriched]:
    return batch


def is_large(enriched: Enriched) -> bool:
    return enriched.large


# -- bindings -----------------------------------------------------------------


def test_an_unbound_logical_topic_is_reported_with_its_environment_variable() -> None:
    problem = only_problem(flow(RecordStep(enrich), output=IntoTopic("nowhere")))
    assert "'nowhere'" in problem
    assert "LOOM_TOPICS__NOWHERE" in problem


def test_an_unbound_source_topic_is_reported_with_its_environment_variable() -> None:
    problem = only_problem(flow(RecordStep(enrich), source=FromTopic("payments", payload=Order)))
    assert problem.startswith("FromTopic 'payments'")
    assert "LOOM_TOPICS__PAYMENTS" in problem


def test_into_sink_naming_a_sink_missing_from_the_config_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), IntoSink("warehouse"), output=None))
    assert "'warehouse'" in problem
    assert "streaming.sinks" in problem


def test_into_sink_naming_a_configured_sink_compiles_to_its_type_and_options() -> None:
    plan = compile_flow(flow(RecordStep(enrich), IntoSink("audit"), output=None), CONFIG)
    assert isinstance(plan.root.end, NamedSinkPlan)
    assert (plan.root.end.name, plan.root.end.sink_type, plan.root.end.options) == (
        "audit",
        "AuditLogSink",
        {"path": "/x"},
    )


# -- structure ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("terminal", "terminal_name"),
    [
        (IntoTopic("output"), "IntoTopic"),
        (IntoSink("audit"), "IntoSink"),
        (Drain(), "Drain"),
        (Router(Route(is_large, IntoTopic("output")), default=Drain()), "Router"),
    ],
    ids=["into_topic", "into_sink", "drain", "router"],
)
def test_a_node_after_a_terminal_node_is_reported(terminal: Any, terminal_name: str) -> None:
    problem = only_problem(
        flow(RecordStep(enrich), terminal, RecordStep(describe, name="late"), output=None)
    )
    assert "RecordStep" in problem
    assert terminal_name in problem
    assert "last" in problem


def test_each_node_after_a_terminal_node_is_reported() -> None:
    problems = problems_of(flow(Drain(), RecordStep(enrich), RecordStep(describe), output=None))
    assert len(problems) == 2
    assert all("after the terminal node Drain" in problem for problem in problems)


def test_a_process_without_terminal_in_a_flow_without_output_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), output=None))
    assert "nowhere to go" in problem


def test_an_output_on_a_process_that_already_ends_in_a_terminal_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), Drain(), output=IntoTopic("output")))
    assert "output" in problem
    assert "Drain" in problem


def test_a_router_with_no_routes_and_no_default_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), Router(name="split"), output=None))
    assert problem == "Router 'split': has no routes"


def test_a_router_route_without_a_terminal_is_reported() -> None:
    router = Router(Route(is_large, Process(RecordStep(describe))), default=Drain())
    problem = only_problem(flow(RecordStep(enrich), router, output=None))
    assert problem.startswith("route 0 of Router 'router'")
    assert "nowhere to go" in problem


def test_a_non_callable_route_predicate_is_reported() -> None:
    router = Router(Route("large", IntoTopic("output")), default=Drain())  # type: ignore[arg-type]
    problem = only_problem(flow(RecordStep(enrich), router, output=None))
    assert "'large' is not callable" in problem


def test_a_flow_without_a_name_is_reported() -> None:
    assert only_problem(flow(RecordStep(enrich), name=" ")) == "the flow needs a non-empty name"


# -- batching -----------------------------------------------------------------


def test_a_batch_step_without_collect_batch_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), BatchStep(dedupe)))
    assert problem.startswith("BatchStep 'dedupe'")
    assert "CollectBatch" in problem


def test_a_record_step_after_collect_batch_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), CollectBatch(10, 100), RecordStep(describe)))
    assert problem.startswith("RecordStep 'describe'")
    assert "use BatchStep" in problem


def test_a_terminal_right_after_collect_batch_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), CollectBatch(10, 100), Drain(), output=None))
    assert problem.startswith("Drain")
    assert "CollectBatch" in problem


@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_collect_batch_max_records_is_reported(value: int) -> None:
    problem = only_problem(flow(RecordStep(enrich), CollectBatch(value, 100), BatchStep(dedupe)))
    assert f"max_records must be >= 1, got {value}" in problem


@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_collect_batch_timeout_ms_is_reported(value: int) -> None:
    problem = only_problem(flow(RecordStep(enrich), CollectBatch(10, value), BatchStep(dedupe)))
    assert f"timeout_ms must be >= 1, got {value}" in problem


# -- sync and async -----------------------------------------------------------


def test_an_async_function_in_a_record_step_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), RecordStep(lookup)))
    assert problem.startswith("RecordStep 'lookup'")
    assert "WithAsync" in problem


def test_a_sync_function_in_with_async_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), WithAsync(describe)))
    assert problem.startswith("WithAsync 'describe'")
    assert "not an async function" in problem


@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_with_async_max_concurrency_is_reported(value: int) -> None:
    problem = only_problem(flow(RecordStep(enrich), WithAsync(lookup, max_concurrency=value)))
    assert f"max_concurrency must be >= 1, got {value}" in problem


@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_with_async_timeout_ms_is_reported(value: int) -> None:
    problem = only_problem(flow(RecordStep(enrich), WithAsync(lookup, timeout_ms=value)))
    assert f"timeout_ms must be >= 1 or None, got {value}" in problem


def test_a_step_function_without_a_record_parameter_is_reported() -> None:
    def constant() -> Enriched:
        return Enriched("x", 1.0, False)

    problem = only_problem(flow(RecordStep(constant)))
    assert "must take the record as its first argument" in problem


def test_a_non_callable_step_is_reported() -> None:
    problem = only_problem(flow(RecordStep("enrich", name="by_name")))  # type: ignore[arg-type]
    assert problem == "RecordStep 'by_name': 'enrich' is not callable"


# -- codecs -------------------------------------------------------------------


def test_an_unknown_codec_name_is_reported() -> None:
    source = FromTopic("input", payload=Order, codec="avro")  # type: ignore[arg-type]
    problem = only_problem(flow(RecordStep(enrich), source=source))
    assert "unknown codec 'avro'" in problem


def test_the_raw_codec_with_a_typed_payload_is_reported() -> None:
    problem = only_problem(
        flow(RecordStep(enrich), output=IntoTopic("output", payload=Enriched, codec="raw"))
    )
    assert "raw codec" in problem
    assert "Enriched" in problem


def test_a_pydantic_payload_with_the_msgpack_codec_is_reported() -> None:
    def customer(order: Order) -> Customer:
        return Customer(id=order.id)

    problem = only_problem(
        flow(RecordStep(customer), output=IntoTopic("output", payload=Customer, codec="msgpack"))
    )
    assert "pydantic" in problem
    assert "'msgpack'" in problem


# -- annotated types ----------------------------------------------------------


def test_a_step_annotated_for_another_type_than_the_previous_step_returns_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), RecordStep(enrich, name="again")))
    assert problem == (
        "RecordStep 'again' expects Order but receives Enriched from the previous node"
    )


def test_a_first_step_annotated_for_another_type_than_the_source_payload_is_reported() -> None:
    problem = only_problem(flow(RecordStep(describe)))
    assert "expects Enriched but receives Order" in problem


def test_into_topic_with_a_payload_type_receiving_another_annotated_type_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), output=IntoTopic("output", payload=Order)))
    assert (
        problem == "IntoTopic 'output' expects Order but receives Enriched from the previous node"
    )


def test_a_batch_step_annotated_for_another_element_type_is_reported() -> None:
    problem = only_problem(flow(CollectBatch(10, 100), BatchStep(dedupe)))
    assert "BatchStep 'dedupe' expects Enriched but receives Order" in problem


def test_the_element_type_of_an_expand_step_flows_to_the_next_step() -> None:
    def split(order: Order) -> Iterator[Order]:
        yield order

    problem = only_problem(flow(ExpandStep(split), RecordStep(describe)))
    assert "expects Enriched but receives Order" in problem


def test_unannotated_steps_are_not_type_checked() -> None:
    plan = compile_flow(flow(RecordStep(lambda order: order), RecordStep(describe)), CONFIG)
    assert [step.node_id for step in plan.root.steps] == ["lambda", "describe"]


# -- error routes -------------------------------------------------------------


def test_an_error_kind_routed_twice_is_reported() -> None:
    errors = {
        ErrorKind.WIRE: IntoTopic("dlq"),
        (ErrorKind.WIRE, ErrorKind.TASK, ErrorKind.BUSINESS): Drain(),
        (ErrorKind.ROUTING, ErrorKind.DELIVERY, ErrorKind.TIMEOUT): IntoTopic("dlq"),
    }
    problem = only_problem(flow(RecordStep(enrich), errors=errors))
    assert problem == "errors: ErrorKind.WIRE is routed more than once"


def test_error_kinds_without_a_route_are_reported_by_name() -> None:
    errors = {(ErrorKind.WIRE, ErrorKind.TASK, ErrorKind.BUSINESS): IntoTopic("dlq")}
    problem = only_problem(flow(RecordStep(enrich), errors=errors))
    assert "ErrorKind.ROUTING, ErrorKind.DELIVERY, ErrorKind.TIMEOUT have no route" in problem
    assert "ErrorKind.WIRE" not in problem


def test_a_flow_without_errors_reports_every_kind_it_can_raise_as_unrouted() -> None:
    problem = only_problem(flow(RecordStep(enrich), errors=None))
    for kind in ErrorKind:
        if kind is not ErrorKind.LATE:  # only windows raise it
            assert f"ErrorKind.{kind.name}" in problem
    assert "ErrorKind.LATE" not in problem


def test_a_flow_with_a_window_must_route_late_records() -> None:
    errors = {kind: IntoTopic("dlq") for kind in ErrorKind if kind is not ErrorKind.LATE}
    window = WindowAggregate(Tumbling(1000), Count())
    problem = only_problem(flow(window, errors=errors))
    assert "ErrorKind.LATE have no route" in problem


def test_an_error_route_that_is_not_a_terminal_is_reported() -> None:
    problem = only_problem(flow(RecordStep(enrich), errors=Process(Drain())))
    assert problem.startswith("errors:")
    assert "is not a terminal" in problem


# -- several problems ---------------------------------------------------------


def test_every_problem_of_a_flow_is_reported_in_one_exception() -> None:
    declared = flow(
        RecordStep(fetch),  # 2: async function in a RecordStep
        WithAsync(describe, max_concurrency=0),  # 3, 4: limit and sync function
        IntoSink("warehouse"),  # 5: sink missing from the config
        source=FromTopic("payments", payload=Order),  # 1: unbound topic
        output=IntoTopic("output"),  # 6: output after a terminal
        errors={ErrorKind.WIRE: IntoTopic("dlq")},  # 7: kinds without route
    )
    problems = problems_of(declared)
    expected = [
        "LOOM_TOPICS__PAYMENTS",
        "RecordStep 'fetch': fetch is async",
        "WithAsync 'describe': max_concurrency must be >= 1, got 0",
        "WithAsync 'describe': describe is not an async function",
        "no sink named 'warehouse'",
        "already ends in IntoSink",
        "ErrorKind.TASK, ErrorKind.BUSINESS, ErrorKind.ROUTING, ErrorKind.DELIVERY, "
        "ErrorKind.TIMEOUT have no route",
    ]
    assert len(problems) == len(expected), problems
    for fragment in expected:
        assert sum(fragment in problem for problem in problems) == 1, (fragment, problems)


def test_the_exception_message_counts_and_lists_every_problem() -> None:
    with pytest.raises(FlowValidationError) as excinfo:
        compile_flow(flow(RecordStep(fetch), output=IntoTopic("nowhere")), CONFIG)
    message = str(excinfo.value)
    assert message.startswith("flow 'orders' is invalid (2 problems):")
    for problem in excinfo.value.problems:
        assert f"\n  - {problem}" in message


def test_a_flow_validation_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="is invalid"):
        compile_flow(flow(output=None), CONFIG)


# -- valid flows --------------------------------------------------------------


def keep_large(enriched: Enriched) -> Enriched | None:
    return enriched if enriched.large else None


def is_small(enriched: Enriched) -> bool:
    return not enriched.large


WIDE_CONFIG = ConfigContext.from_dict(
    {
        "topics": {
            "orders.in": "prod.orders.v1",
            "orders.out": "prod.large-orders.v1",
            "orders.dlq": "prod.orders.dlq",
        }
    }
)


def wide_flow() -> StreamFlow[Order, Enriched]:
    """Every node type, with names that collide and contain dots."""
    return StreamFlow(
        "orders.wide",
        source=FromTopic("orders.in", payload=Order),
        process=Process(
            RecordStep(enrich, name="enrich.v2"),
            RecordStep(keep_large),
            CollectBatch(50, timeout_ms=200),
            BatchStep(dedupe),
            WithAsync(lookup, max_concurrency=8, timeout_ms=1000),
            Router(
                Route(is_large, IntoTopic("orders.out")),
                Route(
                    is_small,
                    Process(RecordStep(keep_large, name="enrich.v2"), IntoTopic("orders.out")),
                ),
                default=Drain(),
            ),
        ),
        errors={
            ErrorKind.WIRE: IntoTopic("orders.dlq"),
            (
                ErrorKind.TASK,
                ErrorKind.BUSINESS,
                ErrorKind.ROUTING,
                ErrorKind.DELIVERY,
                ErrorKind.TIMEOUT,
            ): Drain(name="discarded.errors"),
        },
    )


def node_ids(plan: FlowPlan) -> list[str]:
    """Every node id of the plan; an error terminal shared by kinds counts once."""
    ids = [plan.source.node_id]

    def walk(branch: BranchPlan) -> None:
        ids.extend(step.node_id for step in branch.steps)
        ids.append(branch.end.node_id)
        if isinstance(branch.end, RouterPlan):
            for route in branch.end.routes:
                walk(route.branch)
            if branch.end.default is not None:
                walk(branch.end.default)

    walk(plan.root)
    error_terminals = {id(terminal): terminal for terminal in plan.error_routes.values()}
    ids.extend(terminal.node_id for terminal in error_terminals.values())
    return ids


def test_a_valid_flow_compiles_into_a_plan_with_unique_bytewax_safe_node_ids() -> None:
    ids = node_ids(compile_flow(wide_flow(), WIDE_CONFIG))
    assert len(ids) == len(set(ids)), ids
    for node_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", node_id), node_id


def test_a_valid_flow_compiles_every_node_into_its_plan() -> None:
    plan = compile_flow(wide_flow(), WIDE_CONFIG)
    assert plan.name == "orders.wide"
    assert plan.source.binding.physical == "prod.orders.v1"
    assert plan.source.binding.payload_type is Order
    assert [type(step) for step in plan.root.steps] == [
        StepPlan,
        StepPlan,
        CollectPlan,
        StepPlan,
        AsyncPlan,
    ]
    assert [step.kind for step in plan.root.steps if isinstance(step, StepPlan)] == [
        "record",
        "record",
        "batch",
    ]
    [async_step] = [step for step in plan.root.steps if isinstance(step, AsyncPlan)]
    assert (async_step.max_concurrency, async_step.timeout_ms) == (8, 1000)
    assert plan.has_async
    router = plan.root.end
    assert isinstance(router, RouterPlan)
    assert len(router.routes) == 2
    assert isinstance(router.default, BranchPlan)
    assert isinstance(router.default.end, DrainPlan)
    terminals = list(plan.root.terminals())
    assert [type(terminal) for terminal in terminals] == [TopicSinkPlan, TopicSinkPlan, DrainPlan]
    assert {t.binding.physical for t in terminals if isinstance(t, TopicSinkPlan)} == {
        "prod.large-orders.v1"
    }


def test_node_count_counts_every_node_of_the_plan_once() -> None:
    plan = compile_flow(wide_flow(), WIDE_CONFIG)
    # source 1 + steps 5 + router 1 + route terminal 1 + route step and terminal 2
    # + default drain 1 + error terminals 2
    assert plan.node_count == 13
    assert len(node_ids(plan)) == plan.node_count


def test_a_mapping_of_error_routes_covers_every_error_kind() -> None:
    plan = compile_flow(wide_flow(), WIDE_CONFIG)
    assert set(plan.error_routes) == set(ErrorKind) - {ErrorKind.LATE}  # no window: unrouted
    wire = plan.error_routes[ErrorKind.WIRE]
    assert isinstance(wire, TopicSinkPlan)
    assert wire.binding.physical == "prod.orders.dlq"
    others = {route for kind, route in plan.error_routes.items() if kind is not ErrorKind.WIRE}
    assert len(others) == 1
    assert all(isinstance(terminal, DrainPlan) for terminal in others)


def test_one_error_terminal_routes_every_error_kind_to_the_same_node() -> None:
    plan = compile_flow(flow(RecordStep(enrich)), CONFIG)
    assert set(plan.error_routes) == set(ErrorKind)
    assert len({terminal.node_id for terminal in plan.error_routes.values()}) == 1


def test_compiling_runs_no_user_function_and_opens_no_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("compile_flow touched the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)

    def step(order: Order) -> Enriched:
        raise AssertionError("compile_flow called a step")

    def expand(enriched: Enriched) -> list[Enriched]:
        raise AssertionError("compile_flow called an expand step")

    def batch(batch: list[Enriched]) -> list[Enriched]:
        raise AssertionError("compile_flow called a batch step")

    async def call_service(enriched: Enriched) -> Enriched:
        raise AssertionError("compile_flow called an async step")

    def predicate(enriched: Enriched) -> bool:
        raise AssertionError("compile_flow called a route predicate")

    config = ConfigContext.from_dict(
        {
            "kafka": {"bootstrap_servers": "broker.invalid:9092"},
            "topics": dict(CONFIG.topics),
            "streaming": {"sinks": {"audit": {"type": "NeverRegisteredSink"}}},
        }
    )
    declared = flow(
        RecordStep(step),
        ExpandStep(expand),
        CollectBatch(10, 100),
        BatchStep(batch),
        WithAsync(call_service),
        Router(Route(predicate, IntoSink("audit")), default=IntoTopic("output")),
        output=None,
    )
    plan = compile_flow(declared, config)
    assert plan.node_count == 10
