"""ConfigContext loading and validation, and how the runner turns it into Bytewax settings.

Covers the YAML loader (``${VAR}`` / ``${VAR:-default}``), the
``streaming.runtime`` section becoming a BytewaxRuntimeConfig, Kafka settings
and secrets, the three StreamingRunner constructors, and the exact mapping of
runtime settings onto ``bytewax.run.cli_main`` arguments.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydantic
import pytest
from bytewax.recovery import RecoveryConfig

from loom.config import ConfigContext, KafkaSettings, SinkSettings
from loom.config.interpolation import MissingVariableError
from loom.streaming import FlowValidationError, IntoTopic, StreamFlow
from loom.streaming.bytewax.runner import (
    BytewaxRecoverySettings,
    BytewaxRuntimeConfig,
    StreamingRunner,
    _create_bridge,
    _recovery_config,
    _runtime_kwargs,
    _to_timedelta,
)
from loom.streaming.plan import FlowPlan
from tests.runtime.payloads import enrich_flow

TOPICS = {"input": "orders.v1", "output": "enriched.v1", "dlq": "orders.dlq"}
PASSWORD = "hunter2-not-for-logs"


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "loom.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def runtime_of(runtime: dict[str, Any]) -> BytewaxRuntimeConfig:
    return ConfigContext.from_dict({"streaming": {"runtime": runtime}}).runtime


# -- from_dict ----------------------------------------------------------------


def test_from_dict_builds_every_section() -> None:
    config = ConfigContext.from_dict(
        {
            "kafka": {"bootstrap_servers": "b1:9092,b2:9092", "group_id": "orders-svc"},
            "topics": TOPICS,
            "streaming": {
                "runtime": {"workers_per_process": 2},
                "sinks": {"audit": {"type": "AuditLogSink", "options": {"path": "/a.jsonl"}}},
            },
            "observability": {"prometheus_port": 9464},
        }
    )
    assert config.kafka.bootstrap_servers == "b1:9092,b2:9092"
    assert config.kafka.group_id == "orders-svc"
    assert config.topics == TOPICS
    assert config.runtime == BytewaxRuntimeConfig(workers_per_process=2)
    assert config.streaming.sinks == {
        "audit": SinkSettings(type="AuditLogSink", options={"path": "/a.jsonl"})
    }
    assert config.observability.prometheus_port == 9464


def test_an_empty_mapping_gives_the_defaults() -> None:
    config = ConfigContext.from_dict({})
    assert config == ConfigContext()
    assert config.runtime == BytewaxRuntimeConfig()
    assert config.topics == {}
    assert config.kafka.client_config() == {}


@pytest.mark.parametrize(
    ("data", "location"),
    [
        ({"kafka": {"bootstrap_server": "b:9092"}}, "kafka.bootstrap_server"),
        ({"topic": {"input": "x"}}, "topic"),
        ({"streaming": {"sink": {}}}, "streaming.sink"),
    ],
)
def test_a_misspelt_key_is_rejected_instead_of_ignored(data: dict[str, Any], location: str) -> None:
    with pytest.raises(pydantic.ValidationError) as excinfo:
        ConfigContext.from_dict(data)
    assert location in str(excinfo.value)


# -- from_yaml and interpolation ----------------------------------------------


def test_from_yaml_substitutes_environment_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BROKERS", "b1:9092,b2:9092")
    monkeypatch.setenv("ENV", "prod")
    path = write_yaml(
        tmp_path,
        """
        kafka:
          bootstrap_servers: ${BROKERS}
        topics:
          input: ${ENV}.orders.v1
          output: ${ENV}.enriched-${ENV}.v1
        """,
    )
    config = ConfigContext.from_yaml(path)
    assert config.kafka.bootstrap_servers == "b1:9092,b2:9092"
    assert config.topics == {"input": "prod.orders.v1", "output": "prod.enriched-prod.v1"}


def test_from_yaml_uses_the_default_of_an_unset_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOOM_TEST_GROUP", raising=False)
    path = write_yaml(tmp_path, "kafka:\n  group_id: ${LOOM_TEST_GROUP:-orders-svc}\n")
    assert ConfigContext.from_yaml(path).kafka.group_id == "orders-svc"


def test_from_yaml_uses_the_default_of_a_variable_set_to_the_empty_string(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_TEST_GROUP", "")
    path = write_yaml(tmp_path, "kafka:\n  group_id: ${LOOM_TEST_GROUP:-orders-svc}\n")
    assert ConfigContext.from_yaml(path).kafka.group_id == "orders-svc"


def test_from_yaml_prefers_a_set_variable_over_its_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_TEST_GROUP", "payments-svc")
    path = write_yaml(tmp_path, "kafka:\n  group_id: ${LOOM_TEST_GROUP:-orders-svc}\n")
    assert ConfigContext.from_yaml(path).kafka.group_id == "payments-svc"


def test_from_yaml_accepts_an_explicit_environment_instead_of_os_environ(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_TEST_INPUT", "from-os-environ")
    path = write_yaml(tmp_path, "topics:\n  input: ${LOOM_TEST_INPUT}\n")
    config = ConfigContext.from_yaml(path, environ={"LOOM_TEST_INPUT": "from-argument"})
    assert config.topics == {"input": "from-argument"}


def test_from_yaml_with_a_missing_variable_without_default_raises_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LOOM_TEST_BROKERS", raising=False)
    path = write_yaml(tmp_path, "kafka:\n  bootstrap_servers: ${LOOM_TEST_BROKERS}\n")
    with pytest.raises(MissingVariableError) as excinfo:
        ConfigContext.from_yaml(path)
    assert excinfo.value.name == "LOOM_TEST_BROKERS"
    assert "LOOM_TEST_BROKERS" in str(excinfo.value)


@pytest.mark.parametrize(
    "value",
    [
        "orders\ntopics: {evil: hijacked}",
        "{evil: hijacked}",
        "[a, b]",
        "&anchor *alias",
        "orders # comment",
    ],
)
def test_an_interpolated_value_cannot_inject_yaml_structure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LOOM_TEST_INPUT", value)
    path = write_yaml(tmp_path, "topics:\n  input: ${LOOM_TEST_INPUT}\n  output: out\n")
    assert ConfigContext.from_yaml(path).topics == {"input": value, "output": "out"}


def test_an_empty_yaml_file_gives_the_defaults(tmp_path: Path) -> None:
    assert ConfigContext.from_yaml(write_yaml(tmp_path, "")) == ConfigContext()


def test_a_yaml_file_whose_top_level_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "- kafka\n- topics\n")
    with pytest.raises(ValueError, match="top level of a config file must be a mapping"):
        ConfigContext.from_yaml(path)


# -- streaming.runtime --------------------------------------------------------


def test_the_streaming_runtime_section_becomes_a_bytewax_runtime_config_from_strings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "WORKERS": "4",
        "PROCESS_ID": "1",
        "ADDRESSES": "h0:2101,h1:2101,h2:2101",
        "EPOCH_MS": "2500",
        "DB_DIR": str(tmp_path / "recovery"),
        "BACKUP_MS": "30000",
        "BACKEND": "trio",
        "UVLOOP": "false",
        "SHUTDOWN_MS": "5000",
    }.items():
        monkeypatch.setenv(f"LOOM_TEST_{name}", value)
    path = write_yaml(
        tmp_path,
        """
        streaming:
          runtime:
            workers_per_process: ${LOOM_TEST_WORKERS}
            process_id: ${LOOM_TEST_PROCESS_ID}
            addresses: ${LOOM_TEST_ADDRESSES}
            epoch_interval_ms: ${LOOM_TEST_EPOCH_MS}
            recovery:
              db_dir: ${LOOM_TEST_DB_DIR}
              backup_interval_ms: ${LOOM_TEST_BACKUP_MS}
            async_backend: ${LOOM_TEST_BACKEND}
            use_uvloop: ${LOOM_TEST_UVLOOP}
            force_shutdown_timeout_ms: ${LOOM_TEST_SHUTDOWN_MS}
        """,
    )
    config = ConfigContext.from_yaml(path)
    assert config.runtime is config.streaming.runtime
    assert config.runtime == BytewaxRuntimeConfig(
        workers_per_process=4,
        process_id=1,
        addresses=("h0:2101", "h1:2101", "h2:2101"),
        epoch_interval_ms=2500,
        recovery=BytewaxRecoverySettings(
            db_dir=str(tmp_path / "recovery"), backup_interval_ms=30000
        ),
        async_backend="trio",
        use_uvloop=False,
        force_shutdown_timeout_ms=5000,
    )


def test_runtime_addresses_are_read_from_a_comma_separated_string() -> None:
    runtime = runtime_of({"addresses": " h0:2101 , h1:2101 ", "process_id": 0})
    assert runtime.addresses == ("h0:2101", "h1:2101")


def test_runtime_addresses_are_read_from_a_json_list() -> None:
    runtime = runtime_of({"addresses": '["h0:2101", "h1:2101"]', "process_id": 1})
    assert runtime.addresses == ("h0:2101", "h1:2101")
    assert runtime.process_id == 1


def test_runtime_addresses_are_read_from_a_yaml_list() -> None:
    runtime = runtime_of({"addresses": ["h0:2101", "h1:2101"], "process_id": 0})
    assert runtime.addresses == ("h0:2101", "h1:2101")


def test_an_empty_addresses_string_means_a_single_process() -> None:
    runtime = runtime_of({"addresses": ""})
    assert runtime.addresses is None


@pytest.mark.parametrize(
    ("runtime", "field"),
    [
        ({"workers_per_process": 0}, "workers_per_process"),
        ({"workers_per_process": "0"}, "workers_per_process"),
        ({"async_backend": "gevent"}, "async_backend"),
        ({"epoch_interval_ms": -5}, "epoch_interval_ms"),
        ({"epoch_interval_ms": "-5"}, "epoch_interval_ms"),
        ({"force_shutdown_timeout_ms": 0}, "force_shutdown_timeout_ms"),
        ({"addresses": "h0:2101,h1:2101"}, "process_id"),
        ({"addresses": "h0:2101,h1:2101", "process_id": 2}, "process_id"),
        ({"process_id": 1}, "addresses"),
        ({"recovery": {"db_dir": "/r", "backup_interval_ms": -1}}, "backup_interval_ms"),
        ({"workers": 2}, "workers"),
    ],
    ids=[
        "zero_workers",
        "zero_workers_string",
        "unknown_async_backend",
        "negative_epoch_interval",
        "negative_epoch_interval_string",
        "zero_force_shutdown_timeout",
        "addresses_without_process_id",
        "process_id_outside_addresses",
        "process_id_without_addresses",
        "negative_backup_interval",
        "unknown_key",
    ],
)
def test_an_invalid_runtime_value_is_rejected_naming_the_field(
    runtime: dict[str, Any], field: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as excinfo:
        runtime_of(runtime)
    [error] = excinfo.value.errors()
    assert error["loc"] == ("streaming", "runtime")
    assert field in error["msg"]


# -- kafka settings and secrets -----------------------------------------------


@pytest.mark.parametrize("section", ["consumer", "producer"])
def test_librdkafka_settings_accept_a_json_object_string(section: str) -> None:
    kafka = KafkaSettings.model_validate(
        {section: '{"enable.auto.commit": false, "fetch.min.bytes": 1024}'}
    )
    assert getattr(kafka, section) == {"enable.auto.commit": False, "fetch.min.bytes": 1024}


def test_librdkafka_settings_accept_a_mapping() -> None:
    kafka = KafkaSettings.model_validate({"consumer": {"auto.offset.reset": "earliest"}})
    assert kafka.consumer == {"auto.offset.reset": "earliest"}


@pytest.mark.parametrize("value", ['{"enable.auto.commit": false', "enable.auto.commit=false"])
def test_malformed_json_consumer_settings_are_rejected(value: str) -> None:
    with pytest.raises(pydantic.ValidationError) as excinfo:
        ConfigContext.from_dict({"kafka": {"consumer": value}})
    [error] = excinfo.value.errors()
    assert error["loc"] == ("kafka", "consumer")
    assert "invalid JSON" in error["msg"]


def test_json_consumer_settings_that_are_not_an_object_are_rejected() -> None:
    with pytest.raises(pydantic.ValidationError) as excinfo:
        ConfigContext.from_dict({"kafka": {"consumer": "[1, 2]"}})
    [error] = excinfo.value.errors()
    assert error["loc"] == ("kafka", "consumer")


def secured_config() -> ConfigContext:
    return ConfigContext.from_dict(
        {
            "kafka": {
                "bootstrap_servers": "b1:9093",
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": "orders",
                "sasl_password": PASSWORD,
                "ssl_ca_location": "/etc/ssl/ca.pem",
            }
        }
    )


def test_the_sasl_password_never_appears_in_repr_or_str_of_the_config() -> None:
    config = secured_config()
    for text in (repr(config), str(config), repr(config.kafka), str(config.kafka)):
        assert PASSWORD not in text
        assert "orders" in text  # the username is not a secret


def test_the_sasl_password_is_masked_when_the_config_is_dumped() -> None:
    config = secured_config()
    assert PASSWORD not in config.model_dump_json()
    assert PASSWORD not in str(config.model_dump())


def test_client_config_reveals_the_sasl_password_with_the_other_client_settings() -> None:
    assert secured_config().kafka.client_config() == {
        "bootstrap.servers": "b1:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "orders",
        "sasl.password": PASSWORD,
        "ssl.ca.location": "/etc/ssl/ca.pem",
    }


def test_the_sasl_password_from_an_environment_variable_is_kept_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_TEST_PASSWORD", PASSWORD)
    path = write_yaml(tmp_path, "kafka:\n  sasl_password: ${LOOM_TEST_PASSWORD}\n")
    config = ConfigContext.from_yaml(path)
    assert PASSWORD not in repr(config)
    assert config.kafka.client_config() == {"sasl.password": PASSWORD}


def test_a_rejected_sasl_password_is_not_echoed_in_the_validation_error() -> None:
    with pytest.raises(pydantic.ValidationError) as excinfo:
        ConfigContext.from_dict({"kafka": {"sasl_password": 98765432}})
    assert "98765432" not in str(excinfo.value)


def test_importing_loom_config_before_loom_streaming_works() -> None:
    # A fresh interpreter, so no other test has imported loom.streaming first.
    result = subprocess.run(
        [sys.executable, "-c", "from loom.config import ConfigContext; ConfigContext()"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# -- StreamingRunner constructors ---------------------------------------------


def node_ids(plan: FlowPlan) -> list[str]:
    ids = [plan.source.node_id]
    ids.extend(step.node_id for step in plan.root.chain_nodes())
    ids.extend(terminal.node_id for terminal in plan.sink_terminals())
    return ids


RUNNER_DATA: dict[str, Any] = {
    "kafka": {"bootstrap_servers": "b1:9092", "sasl_password": PASSWORD},
    "topics": TOPICS,
    "streaming": {"runtime": {"workers_per_process": 2, "epoch_interval_ms": 1000}},
}


def test_streaming_runner_from_yaml_from_dict_and_from_context_are_equivalent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOOM_TEST_PASSWORD", PASSWORD)
    monkeypatch.setenv("LOOM_TEST_WORKERS", "2")
    path = write_yaml(
        tmp_path,
        """
        kafka:
          bootstrap_servers: b1:9092
          sasl_password: ${LOOM_TEST_PASSWORD}
        topics:
          input: orders.v1
          output: enriched.v1
          dlq: orders.dlq
        streaming:
          runtime:
            workers_per_process: ${LOOM_TEST_WORKERS}
            epoch_interval_ms: 1000
        """,
    )
    from_yaml = StreamingRunner.from_yaml(enrich_flow(), path)
    from_dict = StreamingRunner.from_dict(enrich_flow(), RUNNER_DATA)
    from_context = StreamingRunner.from_context(
        enrich_flow(), config=ConfigContext.from_dict(RUNNER_DATA)
    )
    runners = [from_yaml, from_dict, from_context]
    assert from_yaml.config == from_dict.config == from_context.config
    assert from_yaml.config.runtime == BytewaxRuntimeConfig(
        workers_per_process=2, epoch_interval_ms=1000
    )
    assert [node_ids(runner.plan) for runner in runners] == [node_ids(from_dict.plan)] * 3
    assert [runner.plan.node_count for runner in runners] == [4, 4, 4]
    assert {runner.plan.source.binding.physical for runner in runners} == {"orders.v1"}


def test_streaming_runner_compiles_the_flow_when_it_is_built() -> None:
    flow = enrich_flow()
    broken = StreamFlow(
        flow.name, source=flow.source, process=flow.process, output=IntoTopic("nowhere")
    )
    with pytest.raises(FlowValidationError) as excinfo:
        StreamingRunner.from_dict(broken, RUNNER_DATA)
    assert len(excinfo.value.problems) == 2  # the unbound output and the missing error routes


# -- mapping onto bytewax.run.cli_main ----------------------------------------


@pytest.mark.parametrize(
    ("value_ms", "expected"),
    [
        (None, None),
        (0, timedelta(0)),
        (1500, timedelta(milliseconds=1500)),
        (60_000, timedelta(minutes=1)),
    ],
)
def test_to_timedelta_maps_milliseconds_and_keeps_none(
    value_ms: int | None, expected: timedelta | None
) -> None:
    assert _to_timedelta(value_ms) == expected


def test_recovery_config_is_none_without_recovery_settings() -> None:
    assert _recovery_config(None) is None


def test_recovery_config_maps_db_dir_and_backup_interval(tmp_path: Path) -> None:
    recovery = _recovery_config(
        BytewaxRecoverySettings(db_dir=str(tmp_path / "db"), backup_interval_ms=30_000)
    )
    assert isinstance(recovery, RecoveryConfig)
    assert Path(recovery.db_dir) == tmp_path / "db"
    assert recovery.backup_interval == timedelta(seconds=30)


def test_runtime_kwargs_for_the_default_runtime() -> None:
    assert _runtime_kwargs(BytewaxRuntimeConfig()) == {
        "workers_per_process": 1,
        "process_id": None,
        "addresses": None,
        "epoch_interval": None,
        "recovery_config": None,
    }


def test_runtime_kwargs_for_a_fully_populated_runtime(tmp_path: Path) -> None:
    runtime = BytewaxRuntimeConfig(
        workers_per_process=4,
        process_id=2,
        addresses=("h0:2101", "h1:2101", "h2:2101"),
        epoch_interval_ms=2500,
        recovery=BytewaxRecoverySettings(db_dir=str(tmp_path), backup_interval_ms=1500),
        async_backend="trio",
        use_uvloop=True,
        force_shutdown_timeout_ms=5000,
    )
    kwargs = _runtime_kwargs(runtime)
    recovery = kwargs.pop("recovery_config")
    assert kwargs == {
        "workers_per_process": 4,
        "process_id": 2,
        "addresses": ["h0:2101", "h1:2101", "h2:2101"],
        "epoch_interval": timedelta(milliseconds=2500),
    }
    assert type(kwargs["addresses"]) is list
    assert isinstance(recovery, RecoveryConfig)
    assert Path(recovery.db_dir) == tmp_path
    assert recovery.backup_interval == timedelta(milliseconds=1500)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers_per_process": 0}, "workers_per_process must be >= 1"),
        ({"async_backend": "gevent"}, "async_backend must be one of asyncio, trio"),
        ({"epoch_interval_ms": -1}, "epoch_interval_ms must be a positive"),
        ({"epoch_interval_ms": 0}, "epoch_interval_ms must be a positive"),
        ({"force_shutdown_timeout_ms": -1}, "force_shutdown_timeout_ms must be a positive"),
        ({"addresses": ("h0:2101",)}, "process_id is required"),
        ({"process_id": 1}, "process_id needs addresses"),
        ({"addresses": ("h0:2101", "h1:2101"), "process_id": 2}, "not an index"),
        ({"addresses": ("h0:2101", "h1:2101"), "process_id": -1}, "not an index"),
    ],
    ids=[
        "zero_workers",
        "unknown_async_backend",
        "negative_epoch_interval",
        "zero_epoch_interval",
        "negative_force_shutdown_timeout",
        "addresses_without_process_id",
        "process_id_without_addresses",
        "process_id_past_the_addresses",
        "negative_process_id",
    ],
)
def test_bytewax_runtime_config_rejects_invalid_combinations(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BytewaxRuntimeConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"db_dir": ""}, "db_dir must name a directory"),
        ({"db_dir": "/r", "backup_interval_ms": -1}, "backup_interval_ms must be >= 0"),
    ],
)
def test_bytewax_recovery_settings_reject_invalid_values(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        BytewaxRecoverySettings(**kwargs)


def test_process_zero_without_addresses_is_a_single_process_runtime() -> None:
    assert BytewaxRuntimeConfig(process_id=0).process_id == 0


def test_create_bridge_returns_none_for_a_plan_without_with_async() -> None:
    runner = StreamingRunner.from_dict(enrich_flow(), RUNNER_DATA)
    assert not runner.plan.has_async
    assert _create_bridge(runner.plan, BytewaxRuntimeConfig(async_backend="trio")) is None


def test_the_runner_api_default_is_librdkafka_auto_commit_as_documented() -> None:
    delivery = ConfigContext.from_dict({}).kafka.delivery
    assert (delivery.guarantee, delivery.auto_commit) == ("at-most-once", True)


def test_the_runner_api_tracks_commits_when_auto_commit_is_switched_off() -> None:
    config = ConfigContext.from_dict({"kafka": {"consumer": {"enable.auto.commit": False}}})
    assert config.kafka.delivery.guarantee == "at-least-once"


def test_an_explicit_guarantee_in_a_config_file_decides_the_commit_mode() -> None:
    config = ConfigContext.from_dict({"kafka": {"delivery_guarantee": "at-least-once"}})
    assert config.kafka.delivery.auto_commit is False


def test_a_consumer_setting_that_contradicts_the_guarantee_is_rejected() -> None:
    data = {
        "kafka": {"delivery_guarantee": "at-least-once", "consumer": {"enable.auto.commit": True}}
    }
    with pytest.raises(pydantic.ValidationError, match="contradicts the delivery guarantee"):
        ConfigContext.from_dict(data)
