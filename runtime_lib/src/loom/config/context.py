"""``ConfigContext``: the one resolved configuration a runner executes with.

Sources, highest precedence first: explicit arguments, environment variables
(see :mod:`loom.config.settings`), a YAML file, defaults. This module defines
the shape and validation; every loader produces the same object.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from loom.config.delivery import Delivery, DeliveryGuarantee, conflict, resolve
from loom.config.interpolation import interpolate
from loom.config.runtime import BytewaxRuntimeConfig


class _Section(BaseModel):
    # hide_input_in_errors: a rejected value may be a secret (a password of
    # the wrong type, librdkafka settings holding credentials).
    # use_attribute_docstrings: each field's docstring is its description,
    # which ``loom env`` prints next to the variable.
    model_config = ConfigDict(
        extra="forbid", frozen=True, hide_input_in_errors=True, use_attribute_docstrings=True
    )


def _json_object(value: Any) -> Any:
    """Accept a JSON object given as a string (as environment variables are)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"expected a JSON object, got invalid JSON: {exc}") from exc
    return value


LibrdkafkaSettings = Annotated[dict[str, Any], pydantic.BeforeValidator(_json_object)]


class KafkaSettings(_Section):
    """Broker connection and client settings shared by consumers and producers."""

    bootstrap_servers: str | None = None
    """Kafka brokers, host:port[,host:port]."""
    group_id: str | None = None
    """Consumer group holding the committed offsets, one per service."""
    delivery_guarantee: DeliveryGuarantee | None = None
    """at-least-once (a service's default) or at-most-once (librdkafka auto-commit)."""
    security_protocol: str | None = None
    """PLAINTEXT (default), SSL, SASL_PLAINTEXT or SASL_SSL."""
    sasl_mechanism: str | None = None
    """PLAIN, SCRAM-SHA-256, SCRAM-SHA-512 or OAUTHBEARER."""
    sasl_username: str | None = None
    """SASL user name."""
    sasl_password: SecretStr | None = None
    """SASL password: a secret, never logged, traced or printed."""
    ssl_ca_location: str | None = None
    """CA bundle to verify the brokers' TLS certificates."""
    consumer: LibrdkafkaSettings = Field(default_factory=dict)
    """Extra librdkafka consumer settings (JSON object), added to Loom's defaults."""
    producer: LibrdkafkaSettings = Field(default_factory=dict)
    """Extra librdkafka producer settings (JSON object), added to Loom's defaults."""
    create_topics: bool = False
    """Create missing topics at start-up: for local development only."""

    @pydantic.field_validator("consumer")
    @classmethod
    def _commit_mode_agrees(
        cls, consumer: dict[str, Any], info: pydantic.ValidationInfo
    ) -> dict[str, Any]:
        explicit = info.data.get("delivery_guarantee")
        problem = explicit and conflict(explicit, consumer)
        if problem:
            raise ValueError(problem)
        return consumer

    @property
    def delivery(self) -> Delivery:
        """The delivery guarantee in force and what decided it."""
        return resolve(self.delivery_guarantee, self.consumer)

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings common to every client, secrets included.

        Pass the result straight to a client; never log it.
        """
        settings: dict[str, Any] = {}
        if self.bootstrap_servers:
            settings["bootstrap.servers"] = self.bootstrap_servers
        for key, value in (
            ("security.protocol", self.security_protocol),
            ("sasl.mechanism", self.sasl_mechanism),
            ("sasl.username", self.sasl_username),
            ("ssl.ca.location", self.ssl_ca_location),
        ):
            if value is not None:
                settings[key] = value
        if self.sasl_password is not None:
            settings["sasl.password"] = self.sasl_password.get_secret_value()
        return settings


def _runtime_config(value: Any) -> BytewaxRuntimeConfig:
    """Validate the runtime section field by field, reporting every problem.

    Each problem is one line led by the field's name (the settings loader
    turns that into the variable's name).
    """
    if isinstance(value, BytewaxRuntimeConfig):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping of runtime settings, got {type(value).__name__}")
    fields = {field.name: field.type for field in msgspec.structs.fields(BytewaxRuntimeConfig)}
    converted: dict[str, Any] = {}
    problems = []
    for name, item in value.items():
        if name not in fields:
            problems.append(f"{name} is not a runtime setting")
            continue
        raw = _split_addresses(item) if name == "addresses" and isinstance(item, str) else item
        try:
            converted[name] = msgspec.convert(raw, fields[name], strict=False)
        except msgspec.ValidationError as exc:
            problems.append(f"{name} {exc}")
    try:
        runtime = BytewaxRuntimeConfig(**converted)
    except ValueError as exc:  # range and cross-field checks, one line each
        problems += str(exc).splitlines()
    if problems:
        raise ValueError("\n".join(problems))
    return runtime


def _split_addresses(text: str) -> list[str] | None:
    """Addresses come as ``host:port,host:port`` or a JSON list; empty means none."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("["):
        parsed = json.loads(text)
        if not isinstance(parsed, list):
            raise ValueError("addresses must be a JSON list of host:port strings")
        return [str(item) for item in parsed]
    return [part.strip() for part in text.split(",") if part.strip()]


RuntimeSettings = Annotated[
    BytewaxRuntimeConfig,
    pydantic.PlainValidator(_runtime_config),
    pydantic.PlainSerializer(msgspec.to_builtins),
]


class SinkSettings(_Section):
    """A named sink: the registered sink type and the options it is built with."""

    type: str
    options: dict[str, Any] = Field(default_factory=dict)


class StreamingSettings(_Section):
    runtime: RuntimeSettings = Field(default_factory=BytewaxRuntimeConfig)
    sinks: dict[str, SinkSettings] = Field(default_factory=dict)


class ObservabilitySettings(_Section):
    prometheus_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """Port serving /metrics, /healthz and /readyz (unset: no server)."""
    batch_span_ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 0.01
    """Fraction of source polls traced with a ``batch`` span."""


class StateSettings(_Section):
    """Where stateful nodes (``StatefulStep``, ``WindowAggregate``) keep their snapshots."""

    dir: str | None = None
    """Directory for state snapshots, on a persistent volume (one SQLite file per worker)."""
    durability: Literal["durable", "volatile"] = "durable"
    """``volatile`` keeps state in memory only: a crash loses it (an explicit, logged choice)."""
    snapshot_interval_ms: Annotated[int, Field(ge=10)] = 1000
    """How often state is snapshotted; records are committed once in a snapshot."""


class ConfigContext(_Section):
    """The resolved configuration of one service."""

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    topics: dict[str, str] = Field(default_factory=dict)
    streaming: StreamingSettings = Field(default_factory=StreamingSettings)
    observability: ObservabilitySettings = Field(default_factory=ObservabilitySettings)
    state: StateSettings = Field(default_factory=StateSettings)

    @property
    def runtime(self) -> BytewaxRuntimeConfig:
        """The ``streaming.runtime`` section as the runner's runtime config."""
        return self.streaming.runtime

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConfigContext:
        """Validate a plain mapping (the parsed form of the YAML file)."""
        return cls.model_validate(dict(data))

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], *, environ: Mapping[str, str] | None = None
    ) -> ConfigContext:
        """Load a YAML file, substituting ``${VAR}`` / ``${VAR:-default}``."""
        text = Path(path).read_text(encoding="utf-8")
        data = yaml.safe_load(text) or {}
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: the top level of a config file must be a mapping")
        return cls.from_dict(interpolate(data, os.environ if environ is None else environ))
