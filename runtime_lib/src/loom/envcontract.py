"""The environment contract of a flow, derived from the code: ``loom env``.

A service is configured only by environment variables, and its deployment
files (``.env.example``, the compose file, Kubernetes manifests) repeat them.
Instead of trusting those files to follow the code, the contract is derived
from two sources that cannot drift: the flow's logical topics (the
compiler's own walk, :func:`loom.streaming.compiler.logical_topics`) and the
settings models (:func:`loom.config.settings.known_variables`).

``loom env MODULE:ATTR`` lists the contract; ``loom env MODULE:ATTR --check
PATH ...`` checks deployment files against it and exits 1 naming every
missing topic binding and every variable that configures nothing. A
generated service's ``tests/test_deployment.py`` runs the check, so adding a
logical topic to ``flow.py`` fails the service's tests until every
deployment file binds it.

Example::

    $ loom env orders_enricher.flow:flow
    LOOM_KAFKA__BOOTSTRAP_SERVERS  required  Kafka brokers, host:port[,host:port]
    LOOM_TOPICS__INPUT             required  physical topic of logical topic 'input'
    ...
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from loom.config.settings import PREFIX, did_you_mean, known_variables, topic_variable
from loom.graph import load_flow
from loom.streaming.compiler import compile_unbound, logical_topics
from loom.streaming.errors import FlowValidationError
from loom.streaming.nodes import StreamFlow

_DOTENV_LINE = re.compile(r"^\s*(#)?\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
REQUIRED = "LOOM_KAFKA__BOOTSTRAP_SERVERS"
"""Required of every deployment; the consumer group may come from the service's code."""


@dataclass(frozen=True)
class Variable:
    """One variable of the contract."""

    name: str
    required: bool
    meaning: str


@dataclass(frozen=True)
class Environment:
    """The ``LOOM_*`` variables a deployment file sets, and those it only documents.

    A commented-out ``# LOOM_X=...`` line of a dotenv file documents an
    optional variable without setting it.
    """

    path: str
    bound: frozenset[str]
    documented: frozenset[str]


STATE_DIR = "LOOM_STATE__DIR"
"""Required of a flow that keeps state (its snapshots' volume)."""


def contract(flow: StreamFlow[Any, Any]) -> list[Variable]:
    """Every variable ``flow``'s service reads, the required ones first.

    A flow with stateful nodes also requires ``LOOM_STATE__DIR`` (a
    deployment that accepts volatile state sets ``LOOM_STATE__DURABILITY``
    instead, and the check accepts either).
    """
    topics = [
        Variable(topic_variable(topic), True, f"physical topic of logical topic {topic!r}")
        for topic in logical_topics(flow)
    ]
    required = {REQUIRED, STATE_DIR} if keeps_state(flow) else {REQUIRED}
    settings = [
        Variable(name, name in required, meaning) for name, meaning in known_variables().items()
    ]
    return sorted([*settings, *topics], key=lambda v: not v.required)


def keeps_state(flow: StreamFlow[Any, Any]) -> bool:
    """Whether ``flow`` has stateful nodes (False when it does not compile)."""
    try:
        return bool(compile_unbound(flow).state_nodes())
    except FlowValidationError:
        return False


def read_environment(path: str | Path) -> Environment:
    """The variables set in a dotenv file, a YAML file, or every YAML file of a folder.

    YAML is searched anywhere for ``LOOM_*`` keys (a compose ``environment``
    mapping, a ConfigMap's ``data``), ``name: LOOM_*`` entries (a container's
    ``env`` list) and ``LOOM_*=value`` strings (a compose ``environment`` list).
    """
    path = Path(path)
    files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")]) if path.is_dir() else [path]
    bound: set[str] = set()
    documented: set[str] = set()
    for file in files:
        text = file.read_text(encoding="utf-8")
        if file.suffix in (".yaml", ".yml"):
            for document in yaml.safe_load_all(text):
                bound.update(_yaml_variables(document))
            continue
        for line in text.splitlines():
            match = _DOTENV_LINE.match(line)
            if match and match.group(2).upper().startswith(PREFIX):
                (documented if match.group(1) else bound).add(match.group(2).upper())
    return Environment(str(path), frozenset(bound), frozenset(documented | bound))


def _yaml_variables(node: Any) -> Iterable[str]:
    if isinstance(node, Mapping):
        name = node.get("name")
        if isinstance(name, str) and name.upper().startswith(PREFIX) and "value" in node:
            yield name.upper()
        for key, value in node.items():
            if isinstance(key, str) and key.upper().startswith(PREFIX):
                yield key.upper()
            else:
                yield from _yaml_variables(value)
    elif isinstance(node, list):
        for item in node:
            if isinstance(item, str) and item.upper().startswith(PREFIX) and "=" in item:
                yield item.partition("=")[0].upper()
            else:
                yield from _yaml_variables(item)


def check(flow: StreamFlow[Any, Any], environment: Environment) -> list[str]:
    """What ``environment`` gets wrong about ``flow``'s contract, one line each.

    Every required variable must be set; every variable set or documented
    must be one the service reads (a typo or a leftover topic otherwise).
    """
    variables = contract(flow)
    known = [variable.name for variable in variables]
    volatile = "LOOM_STATE__DURABILITY" in environment.bound
    problems = [
        f"{environment.path}: {variable.name} is not set ({variable.meaning})"
        for variable in variables
        if variable.required
        and variable.name not in environment.bound
        and not (variable.name == STATE_DIR and volatile)
    ]
    for name in sorted(environment.documented.difference(known)):
        problems.append(f"{environment.path}: {name} configures nothing{did_you_mean(name, known)}")
    return problems


def _command(args: argparse.Namespace) -> int:
    try:
        flow = load_flow(args.target)
    except Exception as exc:  # the user's module failed while importing
        print(f"loom env: cannot load {args.target}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if not args.check:
        variables = contract(flow)
        width = max(len(variable.name) for variable in variables)
        for variable in variables:
            need = "required" if variable.required else "optional"
            print(f"{variable.name:<{width}}  {need}  {variable.meaning}".rstrip())
        return 0
    problems = []
    for path in args.check:
        try:
            problems += check(flow, read_environment(path))
        except (OSError, yaml.YAMLError) as exc:
            problems.append(f"{path}: cannot read: {exc}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def add_command(commands: Any) -> None:
    """Register ``loom env`` on the ``loom`` command's subparsers."""
    parser = commands.add_parser(
        "env",
        help="list a flow's environment variables, or check deployment files against them",
        description=(
            "List the environment variables a flow's service reads (derived from the flow's "
            "logical topics and the settings), or, with --check, check deployment files: "
            "every required variable set, nothing set that configures nothing. Exit status: "
            "0 fine, 1 a check found problems (one line each), 2 the flow does not load."
        ),
    )
    parser.add_argument(
        "target", metavar="MODULE:ATTR", help="the flow, e.g. orders_enricher.flow:flow"
    )
    parser.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="PATH",
        help="a dotenv file, a YAML file, or a folder of YAML files (one environment); repeatable",
    )
    handler: Callable[[argparse.Namespace], int] = _command
    parser.set_defaults(handler=handler)
