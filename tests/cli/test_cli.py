"""The ``loom`` command as a user runs it: the installed entry point, as a process."""

from __future__ import annotations

import argparse
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

import loom
import loom.devtools.broker as broker_module
from loom.cli import build_parser
from loom.devtools.broker import DevBroker, DevBrokerError, free_port

LOOM = str(Path(sys.executable).with_name("loom"))
REST_MARKUP = re.compile(r"``|:[a-z]+:`|^\s*\.\. \w+::|::$", re.M)


def loom_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LOOM, *args], capture_output=True, text=True, cwd=cwd, timeout=60, check=False
    )


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


# ---------------------------------------------------------------- --version and --help


def test_version_prints_the_runtime_version() -> None:
    result = loom_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["loom-runtime", loom.__version__]


@pytest.mark.parametrize("command", [[], *([name] for name in subcommands())], ids=str)
def test_help_shows_no_rest_markup(command: list[str]) -> None:
    result = loom_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: loom")
    assert not REST_MARKUP.findall(result.stdout), result.stdout


@pytest.mark.parametrize("name", list(subcommands()))
def test_every_option_of_a_command_has_help(name: str) -> None:
    parser = subcommands()[name]
    undocumented = [
        action.dest
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and not (action.help or "").strip()
    ]
    assert undocumented == []


def test_every_top_level_option_and_command_has_help() -> None:
    parser = build_parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    options = [a.dest for a in parser._actions if a is not commands and not a.help]
    assert options == []
    assert [choice.dest for choice in commands._choices_actions if not choice.help] == []


# ---------------------------------------------------------------- loom graph


@pytest.fixture
def flow_dir(tmp_path: Path) -> Path:
    (tmp_path / "bad_flow.py").write_text(
        textwrap.dedent(
            """\
            import msgspec
            from loom.streaming import FromTopic, IntoSink, IntoTopic, Process, StreamFlow
            from loom.streaming import WithAsync


            class Order(msgspec.Struct):
                id: str


            def lookup(order: Order) -> Order:
                return order


            flow = StreamFlow(
                "bad",
                source=FromTopic("input", payload=Order),
                process=Process(WithAsync(lookup, max_concurrency=0)),
                output=IntoTopic("output"),
            )

            unbound = StreamFlow(
                "unbound",
                source=FromTopic("input", payload=Order),
                process=Process(IntoSink("audit")),
                errors=IntoTopic("dlq"),
            )
            """
        ),
        encoding="utf-8",
    )
    return tmp_path


def test_graph_of_an_invalid_flow_exits_2_with_one_line_per_problem(flow_dir: Path) -> None:
    result = loom_cli("graph", "bad_flow:flow", cwd=flow_dir)

    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[0] == "loom graph: bad_flow:flow is not a valid flow (3 problems):"
    assert len(lines) == 4
    assert "max_concurrency must be >= 1" in lines[1]
    assert "lookup is not an async function" in lines[2]
    assert "have no route" in lines[3]


def test_graph_does_not_need_topic_or_sink_bindings(flow_dir: Path) -> None:
    result = loom_cli("graph", "bad_flow:unbound", cwd=flow_dir)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("flowchart LR\n")
    assert "IntoSink: audit" in result.stdout


def test_graph_of_a_module_that_fails_to_import_exits_2_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "broken_flow.py").write_text("raise RuntimeError('no config here')\n")
    result = loom_cli("graph", "broken_flow:flow", cwd=tmp_path)

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "loom graph: importing broken_flow:flow failed: RuntimeError: no config here"
    ]


# ---------------------------------------------------------------- loom dev-broker


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ("orders v1:3", "invalid topic name 'orders v1'"),
        (":3", "invalid topic name ''"),
        ("..", "invalid topic name '..'"),
        ("t" * 250, "invalid topic name"),
        ("orders:0", "invalid partition count '0'"),
        ("orders:-2", "invalid partition count '-2'"),
        ("orders:three", "invalid partition count 'three'"),
        ("orders:1.5", "invalid partition count '1.5'"),
        ("orders:", "invalid partition count ''"),
    ],
)
def test_a_bad_topic_spec_is_an_argparse_error_naming_the_option(spec: str, complaint: str) -> None:
    result = loom_cli("dev-broker", "--port", str(free_port()), "--topic", spec)

    assert result.returncode == 2
    assert result.stdout == ""
    assert f"error: argument --topic: {complaint}" in result.stderr


@pytest.fixture
def listener() -> Iterator[int]:
    """A port some other program listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_dev_broker_on_a_taken_port_says_so_in_one_line_and_exits_1(listener: int) -> None:
    result = loom_cli("dev-broker", "--port", str(listener))

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"loom dev-broker: 127.0.0.1:{listener} is already in use"
    ]


def test_dev_broker_creates_no_topics_on_another_broker_on_its_port(broker: DevBroker) -> None:
    result = loom_cli("dev-broker", "--port", str(broker.port), "--topic", "not-mine:2")

    assert result.returncode == 1
    assert "already in use" in result.stderr
    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    assert "not-mine" not in admin.list_topics(timeout=10).topics


def test_a_broker_that_loses_its_port_to_another_is_not_reported_started(
    broker: DevBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The port is taken between the check and the start: the started broker
    # cannot bind it, while the other one answers on it.
    monkeypatch.setattr(broker_module, "port_in_use", lambda host, port: False)
    with pytest.raises(DevBrokerError, match="exited at start"):
        DevBroker(port=broker.port).start()


def test_dev_broker_creates_its_topics_and_stops_on_sigterm() -> None:
    port = free_port()
    process = subprocess.Popen(
        [LOOM, "dev-broker", "--port", str(port), "--topic", "orders:3", "--topic", "dlq"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        banner = process.stdout.readline()  # written once the topics exist
        assert banner.startswith(f"Kafka-protocol broker (Tansu, in memory) on 127.0.0.1:{port}")
        admin = AdminClient({"bootstrap.servers": f"127.0.0.1:{port}"})
        topics = admin.list_topics(timeout=10).topics
        assert len(topics["orders"].partitions) == 3
        assert "dlq" in topics
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    assert code == 0
    assert not broker_module.port_in_use("127.0.0.1", port), "the broker outlived the command"
