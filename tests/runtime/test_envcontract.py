"""``loom env``: the environment contract derived from a flow, and checks of deployment files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from loom.envcontract import check, contract, read_environment
from loom.streaming import IntoTopic, Route, Router, StatefulStep
from tests.runtime.payloads import enrich_flow

ROOT = Path(__file__).resolve().parents[2]
BOUND = "LOOM_KAFKA__BOOTSTRAP_SERVERS=k:9092\nLOOM_TOPICS__INPUT=a\nLOOM_TOPICS__OUTPUT=b\n"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_the_contract_requires_the_brokers_and_every_logical_topic_of_the_flow() -> None:
    flow = enrich_flow(Router(Route(when=bool, to=IntoTopic("audit")), default=IntoTopic("output")))
    required = [variable.name for variable in contract(flow) if variable.required]
    assert required == [
        "LOOM_KAFKA__BOOTSTRAP_SERVERS",
        "LOOM_TOPICS__INPUT",
        "LOOM_TOPICS__AUDIT",
        "LOOM_TOPICS__OUTPUT",
        "LOOM_TOPICS__DLQ",
    ]


def test_the_contract_lists_every_optional_setting_the_service_reads() -> None:
    optional = {variable.name for variable in contract(enrich_flow()) if not variable.required}
    assert {
        "LOOM_KAFKA__GROUP_ID",
        "LOOM_KAFKA__DELIVERY_GUARANTEE",
        "LOOM_RUNTIME__RECOVERY__DB_DIR",
        "LOOM_OBSERVABILITY__PROMETHEUS_PORT",
        "LOOM_LOG_LEVEL",
    } <= optional


def test_a_dotenv_file_binding_every_topic_passes(tmp_path: Path) -> None:
    path = write(tmp_path, ".env", BOUND + "LOOM_TOPICS__DLQ=c\n# LOOM_KAFKA__GROUP_ID=g\n")
    assert check(enrich_flow(), read_environment(path)) == []


def test_a_topic_the_file_does_not_bind_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, ".env", BOUND)
    assert check(enrich_flow(), read_environment(path)) == [
        f"{path}: LOOM_TOPICS__DLQ is not set (physical topic of logical topic 'dlq')"
    ]


def test_a_commented_out_topic_documents_it_but_does_not_bind_it(tmp_path: Path) -> None:
    path = write(tmp_path, ".env", BOUND + "# LOOM_TOPICS__DLQ=c\n")
    [problem] = check(enrich_flow(), read_environment(path))
    assert "LOOM_TOPICS__DLQ is not set" in problem


def test_a_misspelt_or_leftover_variable_configures_nothing(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        ".env",
        BOUND + "LOOM_TOPICS__DLQ=c\nLOOM_TOPICS__INPUTT=x\n# LOOM_KAFKA__GROUPID=g\n",
    )
    assert check(enrich_flow(), read_environment(path)) == [
        f"{path}: LOOM_KAFKA__GROUPID configures nothing (did you mean LOOM_KAFKA__GROUP_ID?)",
        f"{path}: LOOM_TOPICS__INPUTT configures nothing (did you mean LOOM_TOPICS__INPUT?)",
    ]


def test_a_compose_service_environment_is_read_as_a_mapping_or_a_list(tmp_path: Path) -> None:
    mapping = write(
        tmp_path,
        "compose.yml",
        """
        services:
          svc:
            environment:
              LOOM_KAFKA__BOOTSTRAP_SERVERS: kafka:29092
              LOOM_TOPICS__INPUT: a
          other:
            environment:
              - LOOM_TOPICS__OUTPUT=b
              - LOOM_TOPICS__DLQ=c
        """,
    )
    assert check(enrich_flow(), read_environment(mapping)) == []


def test_a_folder_of_manifests_is_one_environment(tmp_path: Path) -> None:
    k8s = tmp_path / "k8s"
    k8s.mkdir()
    write(
        k8s,
        "configmap.yaml",
        """
        kind: ConfigMap
        data: {LOOM_KAFKA__BOOTSTRAP_SERVERS: k:9092, LOOM_TOPICS__INPUT: a, LOOM_TOPICS__OUTPUT: b}
        """,
    )
    write(
        k8s,
        "statefulset.yaml",
        """
        kind: StatefulSet
        spec:
          template:
            spec:
              containers:
                - env:
                    - {name: LOOM_TOPICS__DLQ, value: c}
        """,
    )
    assert check(enrich_flow(), read_environment(k8s)) == []


def test_loom_env_check_exits_1_listing_each_problem(tmp_path: Path) -> None:
    write(
        tmp_path,
        "flowmod.py",
        """
        from tests.runtime.payloads import enrich_flow

        flow = enrich_flow()
        """,
    )
    env = write(tmp_path, ".env.example", BOUND)
    done = subprocess.run(
        [sys.executable, "-m", "loom.cli", "env", "flowmod:flow", "--check", str(env)],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stderr.splitlines()) == (
        1,
        [f"{env}: LOOM_TOPICS__DLQ is not set (physical topic of logical topic 'dlq')"],
    )


def test_loom_env_lists_the_contract_of_a_flow(tmp_path: Path) -> None:
    write(
        tmp_path,
        "flowmod.py",
        "from tests.runtime.payloads import enrich_flow\nflow = enrich_flow()\n",
    )
    done = subprocess.run(
        [sys.executable, "-m", "loom.cli", "env", "flowmod:flow"],
        cwd=tmp_path,
        env={"PYTHONPATH": f"{ROOT}:{tmp_path}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    first = [line.split()[:2] for line in done.stdout.splitlines()[:4]]
    assert first == [
        ["LOOM_KAFKA__BOOTSTRAP_SERVERS", "required"],
        ["LOOM_TOPICS__INPUT", "required"],
        ["LOOM_TOPICS__OUTPUT", "required"],
        ["LOOM_TOPICS__DLQ", "required"],
    ]


def test_every_variable_of_the_contract_says_what_it_means() -> None:
    unexplained = [variable.name for variable in contract(enrich_flow()) if not variable.meaning]
    assert unexplained == []


def test_a_flow_that_keeps_state_requires_a_state_directory_or_volatile_state(
    tmp_path: Path,
) -> None:
    flow = enrich_flow(StatefulStep(lambda state, value: (state, value)))
    required = [variable.name for variable in contract(flow) if variable.required]
    assert "LOOM_STATE__DIR" in required
    dotenv = BOUND + "LOOM_TOPICS__DLQ=c\n"
    missing = write(tmp_path, "missing.env", dotenv)
    assert [problem.split(": ")[1] for problem in check(flow, read_environment(missing))] == [
        "LOOM_STATE__DIR is not set (Directory for state snapshots, on a persistent volume"
        " (one SQLite file per worker))"
    ]
    volatile = write(tmp_path, "volatile.env", dotenv + "LOOM_STATE__DURABILITY=volatile\n")
    assert check(flow, read_environment(volatile)) == []
    assert "LOOM_STATE__DIR" not in [v.name for v in contract(enrich_flow()) if v.required]
