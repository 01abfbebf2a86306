"""LOOM_* environment variables: precedence, names in errors, StatefulSet mode."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loom.config.settings import SettingsError, load_config, variable_name


def problems(environ: dict[str, str], **kwargs: object) -> list[str]:
    with pytest.raises(SettingsError) as failure:
        load_config(environ=environ, **kwargs)  # type: ignore[arg-type]
    return failure.value.problems


def test_every_documented_variable_is_read() -> None:
    config = load_config(
        environ={
            "LOOM_KAFKA__BOOTSTRAP_SERVERS": "k1:9092,k2:9092",
            "LOOM_KAFKA__GROUP_ID": "orders",
            "LOOM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
            "LOOM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
            "LOOM_KAFKA__SASL_USERNAME": "svc",
            "LOOM_KAFKA__SASL_PASSWORD": "pw",
            "LOOM_KAFKA__SSL_CA_LOCATION": "/etc/ca.pem",
            "LOOM_KAFKA__CONSUMER": '{"enable.auto.commit": false}',
            "LOOM_KAFKA__PRODUCER": '{"linger.ms": 20}',
            "LOOM_TOPICS__INPUT": "orders.v1",
            "LOOM_RUNTIME__WORKERS_PER_PROCESS": "3",
            "LOOM_RUNTIME__PROCESS_ID": "1",
            "LOOM_RUNTIME__ADDRESSES": "a:2101,b:2101",
            "LOOM_RUNTIME__EPOCH_INTERVAL_MS": "500",
            "LOOM_RUNTIME__RECOVERY__DB_DIR": "/var/lib/loom",
            "LOOM_RUNTIME__RECOVERY__BACKUP_INTERVAL_MS": "1000",
            "LOOM_RUNTIME__ASYNC_BACKEND": "trio",
            "LOOM_RUNTIME__USE_UVLOOP": "false",
            "LOOM_RUNTIME__FORCE_SHUTDOWN_TIMEOUT_MS": "7000",
            "LOOM_OBSERVABILITY__PROMETHEUS_PORT": "9100",
        },
        require_kafka=True,
    )
    kafka = config.kafka
    assert kafka.client_config() == {
        "bootstrap.servers": "k1:9092,k2:9092",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "svc",
        "ssl.ca.location": "/etc/ca.pem",
        "sasl.password": "pw",
    }
    assert (kafka.group_id, kafka.consumer, kafka.producer) == (
        "orders",
        {"enable.auto.commit": False},
        {"linger.ms": 20},
    )
    assert config.topics == {"input": "orders.v1"}
    runtime = config.runtime
    assert (runtime.workers_per_process, runtime.process_id, runtime.addresses) == (
        3,
        1,
        ("a:2101", "b:2101"),
    )
    assert (runtime.epoch_interval_ms, runtime.async_backend, runtime.use_uvloop) == (
        500,
        "trio",
        False,
    )
    assert runtime.recovery is not None
    assert (runtime.recovery.db_dir, runtime.recovery.backup_interval_ms) == ("/var/lib/loom", 1000)
    assert runtime.force_shutdown_timeout_ms == 7000
    assert config.observability.prometheus_port == 9100


def test_environment_overrides_the_yaml_file_which_overrides_defaults(tmp_path: Path) -> None:
    path = tmp_path / "loom.yaml"
    path.write_text(
        "kafka: {bootstrap_servers: file:9092, group_id: from-file}\n"
        "topics: {input: file-in, output: file-out}\n"
        "streaming: {runtime: {workers_per_process: 2, epoch_interval_ms: 900}}\n"
    )
    config = load_config(
        environ={
            "LOOM_CONFIG_FILE": str(path),
            "LOOM_KAFKA__GROUP_ID": "from-env",
            "LOOM_TOPICS__OUTPUT": "env-out",
            "LOOM_RUNTIME__WORKERS_PER_PROCESS": "4",
        }
    )
    assert (config.kafka.bootstrap_servers, config.kafka.group_id) == ("file:9092", "from-env")
    assert config.topics == {"input": "file-in", "output": "env-out"}
    assert (config.runtime.workers_per_process, config.runtime.epoch_interval_ms) == (4, 900)
    assert config.runtime.async_backend == "asyncio"


def test_explicit_overrides_win_over_the_environment() -> None:
    config = load_config(
        environ={"LOOM_KAFKA__GROUP_ID": "env"}, overrides={"kafka": {"group_id": "explicit"}}
    )
    assert config.kafka.group_id == "explicit"


def test_each_bad_variable_is_reported_once_by_name() -> None:
    found = problems(
        {
            "LOOM_RUNTIME__WORKERS_PER_PROCESS": "0",
            "LOOM_RUNTIME__EPOCH_INTERVAL_MS": "-5",
            "LOOM_RUNTIME__ASYNC_BACKEND": "gevent",
            "LOOM_KAFKA__PRODUCER": "[1, 2",
            "LOOM_OBSERVABILITY__PROMETHEUS_PORT": "http",
        },
        require_kafka=True,
    )
    named = sorted(line.split(":")[0] for line in found)
    assert named == sorted(
        [
            "LOOM_KAFKA__BOOTSTRAP_SERVERS is required",
            "LOOM_KAFKA__GROUP_ID is required",
            "LOOM_RUNTIME__WORKERS_PER_PROCESS",
            "LOOM_RUNTIME__EPOCH_INTERVAL_MS",
            "LOOM_RUNTIME__ASYNC_BACKEND",
            "LOOM_KAFKA__PRODUCER",
            "LOOM_OBSERVABILITY__PROMETHEUS_PORT",
        ]
    )


def test_range_problems_of_the_runtime_are_all_reported() -> None:
    found = problems(
        {"LOOM_RUNTIME__WORKERS_PER_PROCESS": "0", "LOOM_RUNTIME__EPOCH_INTERVAL_MS": "-5"}
    )
    assert found == [
        "LOOM_RUNTIME__WORKERS_PER_PROCESS: workers_per_process must be >= 1, got 0",
        "LOOM_RUNTIME__EPOCH_INTERVAL_MS: epoch_interval_ms must be a positive number of "
        "milliseconds, got -5",
    ]


def test_a_misspelt_variable_is_an_error_not_silently_ignored() -> None:
    assert problems({"LOOM_KAFKA_BOOTSTRAP_SERVERS": "x"})[0].startswith(
        "LOOM_KAFKA_BOOTSTRAP_SERVERS: unknown setting"
    )
    assert problems({"LOOM_KAFKA__BOOTSTRAP_SERVER": "x"}) == [
        "LOOM_KAFKA__BOOTSTRAP_SERVER: unknown setting "
        "(did you mean LOOM_KAFKA__BOOTSTRAP_SERVERS?)"
    ]


@pytest.mark.parametrize(
    ("misspelt", "meant"),
    [
        ("LOOM_KAFKA__GROUPID", "LOOM_KAFKA__GROUP_ID"),
        ("LOOM_KAFK__GROUP_ID", "LOOM_KAFKA__GROUP_ID"),
        ("LOOM_RUNTIME__WORKER_PER_PROCESS", "LOOM_RUNTIME__WORKERS_PER_PROCESS"),
        ("LOOM_RUNTIME__RECOVERY__DB_DIRR", "LOOM_RUNTIME__RECOVERY__DB_DIR"),
        ("LOOM_OBSERVABILITY__PROMETHEUS_PROT", "LOOM_OBSERVABILITY__PROMETHEUS_PORT"),
    ],
)
def test_a_near_miss_names_the_variable_it_probably_meant(misspelt: str, meant: str) -> None:
    assert problems({misspelt: "1"}) == [f"{misspelt}: unknown setting (did you mean {meant}?)"]


def test_an_invalid_log_level_is_a_settings_problem_naming_the_variable() -> None:
    assert problems({"LOOM_LOG_LEVEL": "LOUD"}) == [
        "LOOM_LOG_LEVEL='LOUD': expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    ]


def test_a_service_needs_a_consumer_group_of_its_own() -> None:
    found = problems({"LOOM_KAFKA__BOOTSTRAP_SERVERS": "k:9092"}, require_kafka=True)
    assert [line.split(" ")[0] for line in found] == ["LOOM_KAFKA__GROUP_ID"]


def test_the_service_default_group_yields_to_the_variable() -> None:
    defaults = {"kafka": {"group_id": "orders-enricher"}}
    assert load_config(environ={}, defaults=defaults).kafka.group_id == "orders-enricher"
    environ = {"LOOM_KAFKA__GROUP_ID": "orders-enricher-replay"}
    assert load_config(environ=environ, defaults=defaults).kafka.group_id == (
        "orders-enricher-replay"
    )


def test_settings_from_the_environment_default_to_at_least_once() -> None:
    environ = {"LOOM_KAFKA__CONSUMER": '{"fetch.wait.max.ms": 50}'}
    delivery = load_config(environ=environ).kafka.delivery
    assert (delivery.guarantee, delivery.auto_commit) == ("at-least-once", False)


def test_at_most_once_is_chosen_by_one_explicit_variable() -> None:
    environ = {"LOOM_KAFKA__DELIVERY_GUARANTEE": "at-most-once"}
    assert load_config(environ=environ).kafka.delivery.auto_commit is True


def test_auto_commit_in_the_consumer_settings_cannot_weaken_the_guarantee() -> None:
    [problem] = problems({"LOOM_KAFKA__CONSUMER": '{"enable.auto.commit": true}'})
    assert problem.startswith("LOOM_KAFKA__CONSUMER: enable.auto.commit=true contradicts")
    assert "LOOM_KAFKA__DELIVERY_GUARANTEE" in problem


def test_an_unknown_delivery_guarantee_is_refused() -> None:
    [problem] = problems({"LOOM_KAFKA__DELIVERY_GUARANTEE": "exactly-once"})
    assert problem.startswith("LOOM_KAFKA__DELIVERY_GUARANTEE: ")
    assert "at-least-once" in problem


def test_a_bad_value_from_the_yaml_file_is_reported_by_file_and_key(tmp_path: Path) -> None:
    path = tmp_path / "loom.yaml"
    path.write_text("observability: {prometheus_port: 99999}\n")
    [problem] = problems({"LOOM_CONFIG_FILE": str(path)})
    assert problem.startswith(f"{path}: observability.prometheus_port: ")


def test_variable_names_follow_the_nesting() -> None:
    assert variable_name(("streaming", "runtime", "recovery", "db_dir")) == (
        "LOOM_RUNTIME__RECOVERY__DB_DIR"
    )
    assert variable_name(("topics", "orders.in")) == "LOOM_TOPICS__ORDERS_IN"


def test_a_statefulset_pod_derives_its_process_id_and_the_cluster_addresses() -> None:
    config = load_config(
        environ={
            "HOSTNAME": "orders-enricher-2",
            "LOOM_RUNTIME__PROCESS_ID_FROM_HOSTNAME": "true",
            "LOOM_RUNTIME__REPLICAS": "3",
            "LOOM_RUNTIME__CLUSTER_SERVICE": "orders-enricher-cluster",
            "LOOM_RUNTIME__CLUSTER_PORT": "2101",
            "LOOM_RUNTIME__WORKERS_PER_PROCESS": "2",
        }
    )
    assert config.runtime.process_id == 2
    assert config.runtime.addresses == tuple(
        f"orders-enricher-{i}.orders-enricher-cluster:2101" for i in range(3)
    )
    assert config.runtime.workers_per_process == 2


def test_scaling_the_statefulset_only_changes_the_replica_count() -> None:
    base = {
        "HOSTNAME": "svc-0",
        "LOOM_RUNTIME__PROCESS_ID_FROM_HOSTNAME": "true",
        "LOOM_RUNTIME__CLUSTER_SERVICE": "svc-headless",
    }
    sizes = [
        len(load_config(environ={**base, "LOOM_RUNTIME__REPLICAS": str(n)}).runtime.addresses or ())
        for n in (1, 4)
    ]
    assert sizes == [1, 4]


def test_statefulset_mode_on_a_hostname_without_ordinal_is_an_error() -> None:
    found = problems(
        {
            "HOSTNAME": "laptop",
            "LOOM_RUNTIME__PROCESS_ID_FROM_HOSTNAME": "true",
            "LOOM_RUNTIME__REPLICAS": "3",
            "LOOM_RUNTIME__CLUSTER_SERVICE": "svc",
        }
    )
    assert found == [
        "LOOM_RUNTIME__PROCESS_ID_FROM_HOSTNAME: hostname 'laptop' is not a StatefulSet pod "
        "name (<name>-<ordinal>)"
    ]


def test_an_explicit_environment_is_read_without_touching_os_environ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LOOM_KAFKA__GROUP_ID", "from-the-process")
    before = dict(os.environ)
    config = load_config(environ={"LOOM_KAFKA__BOOTSTRAP_SERVERS": "k:9092"})
    assert config.kafka.group_id is None
    assert dict(os.environ) == before
