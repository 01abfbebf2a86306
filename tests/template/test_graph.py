"""``loom graph``: a flow drawn as a Mermaid flowchart, faithfully."""

from __future__ import annotations

import re
import textwrap
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from loom.cli import main
from loom.graph import MARKER_END, MARKER_START, embed, mermaid
from loom.streaming import (
    BatchStep,
    CollectBatch,
    Drain,
    ErrorKind,
    ExpandStep,
    FromTopic,
    Hopping,
    IntoSink,
    IntoTopic,
    Process,
    RecordStep,
    Route,
    Router,
    StatefulStep,
    StreamFlow,
    Sum,
    WindowAggregate,
    WithAsync,
)


class Order(msgspec.Struct):
    id: str
    amount: float


def check(order: Order) -> Order:
    return order


async def price(order: Order) -> Order:
    return order


def is_large(order: Order) -> bool:
    return order.amount >= 100


def split(order: Order) -> list[Order]:
    return [order]


def total(batch: list[Order]) -> list[Order]:
    return batch


EXAMPLE = StreamFlow(
    "orders-enricher",
    source=FromTopic("input", payload=Order),
    process=Process(RecordStep(check), WithAsync(price, max_concurrency=100, timeout_ms=5000)),
    output=IntoTopic("output", payload=Order),
    errors=IntoTopic("dlq"),
)


def test_a_linear_flow_shows_source_steps_output_and_where_errors_go() -> None:
    assert mermaid(EXAMPLE) == textwrap.dedent(
        """\
        flowchart LR
            %% flow: orders-enricher
            n0[("FromTopic: input<br/>Order (json)")]
            n1["RecordStep: check"]
            n2(["WithAsync: price<br/>max_concurrency 100, timeout 5000 ms"])
            n3[("IntoTopic: output<br/>Order (json)")]
            n4[("IntoTopic: dlq<br/>json")]
            n0 --> n1
            n1 --> n2
            n2 --> n3
            errors>"errors"]
            n0 -. "WIRE" .-> errors
            n1 -. "TASK, BUSINESS" .-> errors
            n2 -. "TASK, BUSINESS, TIMEOUT" .-> errors
            n3 -. "TASK, DELIVERY" .-> errors
            errors -- "any error" --> n4
        """
    )


def edges(diagram: str) -> list[tuple[str, str, str]]:
    found = []
    for line in diagram.splitlines():
        match = re.fullmatch(r'\s+(\w+) (?:-- "([^"]*)" -->|-->|-\. "([^"]*)" \.->) (\w+)', line)
        if match:
            source, label, error_label, target = match.groups()
            found.append((source, label or error_label or "", target))
    return found


def labels(diagram: str) -> dict[str, str]:
    found = {}
    for line in diagram.splitlines():
        match = re.fullmatch(r'\s+(\w+)\W+"([^"]*)"\W*', line)
        if match:
            found[match.group(1)] = match.group(2)
    return found


def test_router_branches_batches_sinks_and_per_kind_error_routes_are_all_drawn() -> None:
    flow: StreamFlow[Any, Any] = StreamFlow(
        "router-flow",
        source=FromTopic("input", payload=Order, codec="msgpack"),
        process=Process(
            ExpandStep(split),
            CollectBatch(50, timeout_ms=200),
            BatchStep(total, name="sum_batch"),
            Router(
                Route(when=is_large, to=IntoTopic("large")),
                Route(when=lambda order: True, to=Process(RecordStep(check), IntoSink("audit"))),
                default=Drain("rest"),
            ),
        ),
        errors={
            ErrorKind.WIRE: IntoTopic("poison"),
            (ErrorKind.TASK, ErrorKind.BUSINESS, ErrorKind.TIMEOUT): IntoTopic("dlq"),
            (ErrorKind.ROUTING, ErrorKind.DELIVERY): Drain(),
        },
    )
    diagram = mermaid(flow)
    names = labels(diagram)
    ids = {label: node for node, label in names.items()}
    assert ids["FromTopic: input<br/>Order (msgpack)"] == "n0"
    assert names["n1"] == "ExpandStep: split"
    assert names["n2"] == "CollectBatch<br/>max 50 records, 200 ms"
    assert names["n3"] == "BatchStep: sum_batch"
    assert names["n4"] == "Router"
    flow_edges = edges(diagram)
    assert ("n4", "when is_large", ids["IntoTopic: large<br/>json"]) in flow_edges
    assert ("n4", "when lambda", ids["RecordStep: check"]) in flow_edges
    assert (ids["RecordStep: check"], "", ids["IntoSink: audit"]) in flow_edges
    assert ("n4", "default", ids["Drain: rest"]) in flow_edges
    # A router with a default cannot fail with ROUTING; a registered sink raises
    # no error kind (a failing sink stops the run instead).
    assert ("n4", "TASK, BUSINESS", "errors") in flow_edges
    assert not [edge for edge in flow_edges if edge[0] == ids["IntoSink: audit"]]
    error_routes = {
        (label, names[target]) for source, label, target in flow_edges if source == "errors"
    }
    assert error_routes == {
        ("WIRE", "IntoTopic: poison<br/>json"),
        ("TASK, BUSINESS, TIMEOUT", "IntoTopic: dlq<br/>json"),
        ("ROUTING, DELIVERY", "Drain"),
    }
    declared = set(names) | {"errors"}
    assert all(source in declared and target in declared for source, _, target in flow_edges)


def test_a_router_without_default_can_fail_with_routing() -> None:
    flow: StreamFlow[Any, Any] = StreamFlow(
        "no-default",
        source=FromTopic("input"),
        process=Process(Router(Route(when=is_large, to=Drain()))),
        errors=IntoTopic("dlq"),
    )
    assert ("n1", "TASK, BUSINESS, ROUTING", "errors") in edges(mermaid(flow))


def test_labels_are_escaped_for_mermaid() -> None:
    flow: StreamFlow[Any, Any] = StreamFlow(
        'quote "flow"',
        source=FromTopic("in<put>"),
        process=Process(RecordStep(check, name='a "b" & c')),
        output=IntoTopic("out"),
        errors=IntoTopic("dlq"),
    )
    diagram = mermaid(flow)
    assert '["RecordStep: a #quot;b#quot; #amp; c"]' in diagram
    assert "FromTopic: in#lt;put#gt;" in diagram
    assert diagram.splitlines()[1] == '    %% flow: quote "flow"'


def test_embed_replaces_only_the_marked_block() -> None:
    document = f"# Title\n\n{MARKER_START}\nold\n{MARKER_END}\n\nRest.\n"
    updated = embed(document, "flowchart LR\n")
    assert updated == (
        f"# Title\n\n{MARKER_START}\n```mermaid\nflowchart LR\n```\n{MARKER_END}\n\nRest.\n"
    )
    assert embed(updated, "flowchart LR\n") == updated
    with pytest.raises(ValueError, match="loom-graph"):
        embed("no markers", "flowchart LR\n")


@pytest.fixture
def flow_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"graph_flow_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        "from tests.template.test_graph import EXAMPLE\nflow = EXAMPLE\nnot_a_flow = 3\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    return name


def test_the_cli_prints_the_diagram(flow_module: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["graph", f"{flow_module}:flow"]) == 0
    assert capsys.readouterr().out == mermaid(EXAMPLE)
    assert main(["graph", "--markdown", "--direction", "TD", f"{flow_module}:flow"]) == 0
    assert capsys.readouterr().out == f"```mermaid\n{mermaid(EXAMPLE, direction='TD')}```\n"


def test_the_cli_refreshes_and_checks_a_readme(
    flow_module: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"# Service\n{MARKER_START}\nstale\n{MARKER_END}\n", encoding="utf-8")
    target = f"{flow_module}:flow"
    assert main(["graph", target, "--readme", str(readme), "--check"]) == 1
    assert "outdated diagram" in capsys.readouterr().err
    assert main(["graph", target, "--readme", str(readme)]) == 0
    assert mermaid(EXAMPLE) in readme.read_text(encoding="utf-8")
    assert main(["graph", target, "--readme", str(readme), "--check"]) == 0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_colon", "expected module:attribute"),
        ("missing_module_xyz:flow", "No module named"),
        ("{module}:not_a_flow", "is not a StreamFlow (got int)"),
        ("{module}:absent", "has no attribute"),
    ],
)
def test_the_cli_explains_a_bad_target(
    flow_module: str, capsys: pytest.CaptureFixture[str], target: str, message: str
) -> None:
    assert main(["graph", target.format(module=flow_module)]) == 2
    assert message in capsys.readouterr().err


def dedup(seen: bool | None, order: Order) -> tuple[bool, Order | None]:
    return True, None if seen else order


def test_stateful_nodes_are_trapezoids_with_their_window_aggregate_and_key() -> None:
    flow: StreamFlow[Any, Any] = StreamFlow(
        "stateful-flow",
        source=FromTopic("input", payload=Order),
        process=Process(
            Router(
                Route(
                    when=is_large,
                    to=Process(
                        StatefulStep(dedup, key=lambda order: order.id, ttl_ms=60_000),
                        IntoTopic("large"),
                    ),
                ),
                default=Process(
                    WindowAggregate(Hopping(60_000, 10_000), Sum("amount"), grace_ms=500),
                    IntoTopic("totals"),
                ),
            ),
        ),
        errors=IntoTopic("dlq"),
    )
    diagram = mermaid(flow)
    step = "StatefulStep: dedup<br/>key: lambda<br/>ttl 60000 ms"
    window = (
        "WindowAggregate<br/>hopping 60000 ms every 10000 ms, grace 500 ms<br/>"
        "Sum('amount')<br/>key: record key"
    )
    ids = {label: node for node, label in labels(diagram).items()}
    assert f'{ids[step]}[/"{step}"\\]' in diagram  # a trapezoid
    assert f'{ids[window]}[/"{window}"\\]' in diagram
    assert (ids[step], "TASK, BUSINESS", "errors") in edges(diagram)
    assert (ids[window], "TASK, BUSINESS, LATE", "errors") in edges(diagram)
