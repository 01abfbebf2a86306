"""Configuration from the environment: the ``LOOM_*`` variables.

A deployed service is configured only by environment variables. This module
reads them with pydantic-settings (prefix ``LOOM_``, ``__`` for nesting),
merges them over the YAML file named by ``LOOM_CONFIG_FILE`` (if any) and the
defaults, and validates the result as one :class:`ConfigContext`. Every
invalid setting is reported at once, each problem naming the variable (or
the file key) it came from, so an operator fixes a deployment in one round.

Precedence, highest first: explicit overrides, environment, YAML, defaults.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec
import pydantic
import yaml
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from loom.config.context import (
    ConfigContext,
    KafkaSettings,
    ObservabilitySettings,
    StateSettings,
)
from loom.config.delivery import AT_LEAST_ONCE
from loom.config.interpolation import interpolate
from loom.config.runtime import BytewaxRecoverySettings, BytewaxRuntimeConfig
from loom.errors import ConfigPathError, MissingVariableError
from loom.errors import SettingsError as SettingsError  # noqa: PLC0414 (re-export)

PREFIX = "LOOM_"
_SECTIONS = ("kafka", "topics", "runtime", "observability", "state", "config_file")
_TOP_LEVEL = ("config_file", "log_level")
"""Variables outside the config sections (the log level is read by the service)."""
_CLUSTER_KEYS = ("process_id_from_hostname", "replicas", "cluster_service", "cluster_port")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _Environment(BaseSettings):
    """The raw ``LOOM_*`` variables, nested by ``__`` into plain mappings."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, env_nested_delimiter="__", case_sensitive=False, extra="ignore"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values passed in (from :class:`_MappingEnvSource`), never ``os.environ``."""
        return (init_settings,)

    config_file: str | None = None
    kafka: dict[str, Any] = pydantic.Field(default_factory=dict)
    topics: dict[str, Any] = pydantic.Field(default_factory=dict)
    runtime: dict[str, Any] = pydantic.Field(default_factory=dict)
    observability: dict[str, Any] = pydantic.Field(default_factory=dict)
    state: dict[str, Any] = pydantic.Field(default_factory=dict)


def variable_name(path: tuple[str, ...]) -> str:
    """The environment variable that sets config ``path``.

    ``("streaming", "runtime", "workers_per_process")`` is
    ``LOOM_RUNTIME__WORKERS_PER_PROCESS``; the runtime section is
    ``streaming.runtime`` in YAML but ``LOOM_RUNTIME__*`` in the environment.
    """
    if path[:2] == ("streaming", "runtime"):
        path = ("runtime", *path[2:])
    return PREFIX + "__".join(re.sub(r"[^A-Za-z0-9]", "_", part).upper() for part in path)


def describe(error: SettingsError) -> list[str]:
    """``error``'s problems, one line each, naming environment variables.

    A :class:`~loom.errors.ConfigPathError` (raised below the settings
    layer, by config path) is rendered with the variables of its paths.
    """
    if not isinstance(error, ConfigPathError):
        return list(error.problems)
    return [
        f"{', '.join(variable_name(path) for path in paths)}: {_name_paths(message)}"
        for paths, message in error.located
    ]


_MENTIONED_PATH = re.compile(r"\b(?:kafka|state|observability|streaming\.runtime)(?:\.[a-z_]+)+\b")


def _name_paths(message: str) -> str:
    """Config paths a message mentions (``state.durability=...``), as variables."""
    return _MENTIONED_PATH.sub(lambda m: variable_name(tuple(m.group(0).split("."))), message)


def topic_variable(logical: str) -> str:
    """The variable binding logical topic ``logical``: ``LOOM_TOPICS__<LOGICAL>``."""
    return variable_name(("topics", logical))


_OUTSIDE_SECTIONS = {
    "config_file": "a YAML file with the same settings (the variables win over it)",
    "log_level": "DEBUG, INFO (default), WARNING, ERROR or CRITICAL",
    "process_id_from_hostname": "true: a StatefulSet pod's ordinal is its process id",
    "replicas": "the StatefulSet's replica count (with PROCESS_ID_FROM_HOSTNAME)",
    "cluster_service": "the headless service naming each pod (with PROCESS_ID_FROM_HOSTNAME)",
    "cluster_port": "port the Bytewax processes talk on (default 2101)",
}


def known_variables() -> dict[str, str]:
    """Every ``LOOM_*`` variable the settings read and its meaning.

    ``LOOM_TOPICS__<LOGICAL>`` aside (that depends on the flow). Derived from
    the settings models (field docstrings, the runtime's documented
    parameters), so it cannot drift from what :func:`load_config` accepts.
    """
    known = {PREFIX + key.upper(): _OUTSIDE_SECTIONS[key] for key in _TOP_LEVEL}
    for section, model in (
        ("kafka", KafkaSettings),
        ("observability", ObservabilitySettings),
        ("state", StateSettings),
    ):
        for name, info in model.model_fields.items():
            known[variable_name((section, name))] = _plain(info.description or "")
    runtime = _documented_params(BytewaxRuntimeConfig)
    recovery = _documented_params(BytewaxRecoverySettings)
    for field in msgspec.structs.fields(BytewaxRuntimeConfig):
        if field.name != "recovery":
            known[variable_name(("runtime", field.name))] = runtime.get(field.name, "")
            continue
        for sub in msgspec.structs.fields(BytewaxRecoverySettings):
            known[variable_name(("runtime", "recovery", sub.name))] = recovery.get(sub.name, "")
    for key in _CLUSTER_KEYS:
        known[variable_name(("runtime", key))] = _OUTSIDE_SECTIONS[key]
    return known


def _documented_params(cls: type) -> dict[str, str]:
    """``:param name: text`` entries of a class docstring, each text on one line."""
    doc = inspect.getdoc(cls) or ""
    return {
        name: _plain(text)
        for name, text in re.findall(r":param (\w+): (.*?)(?=\n\s*:param |\Z)", doc, re.S)
    }


def _plain(text: str) -> str:
    """Docstring text as one plain line: no reST literals, no final period."""
    return re.sub(r"``([^`]*)``", r"\1", " ".join(text.split())).removesuffix(".")


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest candidate, or nothing."""
    close = difflib.get_close_matches(name.upper(), list(candidates), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def load_config(
    *,
    environ: Mapping[str, str] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
    require_kafka: bool = False,
) -> ConfigContext:
    """Build the service's ``ConfigContext`` from the environment.

    ``defaults`` is the lowest layer (under the YAML file), e.g. a generated
    service's consumer group. This is the service layer: unless a layer sets
    ``kafka.delivery_guarantee``, it is ``at-least-once`` (see
    :mod:`loom.config.delivery`). With ``require_kafka`` (a service about to
    run), brokers and a consumer group must be set.

    :raises SettingsError: listing every invalid or missing setting.
    """
    env_map = dict(os.environ if environ is None else environ)
    problems = _unknown_variables(env_map)
    problems += _log_level_problems(env_map)
    try:
        env = _read_environment(env_map)
    except pydantic.ValidationError as exc:
        raise SettingsError([*problems, *_describe(exc, set(), None)]) from None
    file_path = config_file or env.pop("config_file", None)
    env.pop("config_file", None)
    file_data: dict[str, Any] = {}
    if file_path:
        try:
            file_data = _read_yaml(str(file_path), env_map)
        except (OSError, ValueError, yaml.YAMLError, MissingVariableError) as exc:
            problems.append(f"LOOM_CONFIG_FILE={file_path}: {exc}")
    env_layer = _as_config_layout(env)
    merged = _merge(_merge(_merge(defaults or {}, file_data), env_layer), dict(overrides or {}))
    problems += _derive_cluster(merged, env_map)
    kafka = merged.setdefault("kafka", {})
    if isinstance(kafka, dict):
        kafka.setdefault("delivery_guarantee", AT_LEAST_ONCE)
        if require_kafka:
            problems += _required_kafka(kafka)
    try:
        config = ConfigContext.from_dict(merged)
    except pydantic.ValidationError as exc:
        problems += _describe(exc, _leaf_paths(env_layer), file_path and str(file_path))
        config = None
    if problems or config is None:
        raise SettingsError(problems)
    return config


def _required_kafka(kafka: Mapping[str, Any]) -> list[str]:
    problems = []
    if not kafka.get("bootstrap_servers"):
        problems.append(
            "LOOM_KAFKA__BOOTSTRAP_SERVERS is required: the Kafka brokers as host:port[,host:port]"
        )
    if not kafka.get("group_id"):
        problems.append(
            "LOOM_KAFKA__GROUP_ID is required: the consumer group that holds this "
            "service's committed offsets (one per service, never shared)"
        )
    return problems


def _log_level_problems(env_map: Mapping[str, str]) -> list[str]:
    for name, value in env_map.items():
        if name.upper() == "LOOM_LOG_LEVEL" and value.strip().upper() not in LOG_LEVELS:
            return [f"{name}={value!r}: expected one of {', '.join(LOG_LEVELS)}"]
    return []


class _MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping.

    The same parsing as for ``os.environ`` (prefix, ``__`` nesting, case),
    without touching the process environment: a service passes its
    environment explicitly, tests pass theirs, and nothing is shared
    between threads.
    """

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars during super().__init__
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def _read_environment(env_map: Mapping[str, str]) -> dict[str, Any]:
    values = _MappingEnvSource(_Environment, env_map)()
    return _Environment(**values).model_dump(exclude_defaults=False)


def _unknown_variables(env_map: Mapping[str, str]) -> list[str]:
    """``LOOM_*`` variables that configure nothing (likely typos)."""
    problems = []
    for name in sorted(env_map):
        upper = name.upper()
        if not upper.startswith(PREFIX):
            continue
        rest = upper[len(PREFIX) :].lower()
        if rest in _TOP_LEVEL:
            continue
        section, sep, _ = rest.partition("__")
        if section not in _SECTIONS or not sep:
            hint = did_you_mean(name, known_variables()) or (
                " (expected LOOM_KAFKA__*, LOOM_TOPICS__*, LOOM_RUNTIME__*, "
                "LOOM_OBSERVABILITY__*, LOOM_STATE__*, LOOM_CONFIG_FILE or LOOM_LOG_LEVEL)"
            )
            problems.append(f"{name}: unknown setting{hint}")
    return problems


def _read_yaml(path: str, env_map: Mapping[str, str]) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, Mapping):
        raise ValueError("the top level must be a mapping")
    result: dict[str, Any] = interpolate(data, env_map)
    return result


def _as_config_layout(env: Mapping[str, Any]) -> dict[str, Any]:
    layout = {key: value for key, value in env.items() if value}
    runtime = layout.pop("runtime", None)
    if runtime:
        layout["streaming"] = {"runtime": runtime}
    return layout


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _leaf_paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    paths = set()
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            paths |= _leaf_paths(value, (*prefix, key))
        else:
            paths.add((*prefix, key))
    return paths


def _describe(
    exc: pydantic.ValidationError, from_env: set[tuple[str, ...]], file_path: str | None
) -> list[str]:
    problems = []
    for error in exc.errors(include_input=False):
        loc = tuple(str(part) for part in error["loc"])
        for field, message in _split_runtime_messages(loc, error["msg"]):
            path, text = _unknown_setting((*loc, *field.split(".")) if field else loc, message)
            problems.append(f"{_origin(path, from_env, file_path)}: {text}")
    return problems


def _unknown_setting(path: tuple[str, ...], message: str) -> tuple[tuple[str, ...], str]:
    """An unknown key says so with the nearest known variable; others pass through."""
    unknown = _UNKNOWN_FIELD.fullmatch(message)
    if unknown:  # msgspec names an unknown nested field in its message
        path, message = (*path, unknown.group(1)), "unknown setting"
    if message == "unknown setting" or message.endswith(" is not a runtime setting"):
        message = "unknown setting" + did_you_mean(variable_name(path), known_variables())
    return path, message


def _split_runtime_messages(loc: tuple[str, ...], message: str) -> list[tuple[str, str]]:
    """The runtime section reports several problems, each led by its field name."""
    message = message.removeprefix("Value error, ")
    if loc != ("streaming", "runtime"):
        return [("", _friendly(message))]
    found = []
    for line in message.splitlines():
        field, _, rest = line.partition(" ")
        nested = _NESTED.search(rest)
        if nested:  # e.g. "recovery Expected `int` - at `$.backup_interval_ms`"
            field, rest = f"{field}.{nested.group(1)}", rest[: nested.start()]
        found.append((field, rest if rest[:1].isupper() else line))
    return found


_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(\w+)`")
_NESTED = re.compile(r" - at `\$\.([\w.]+)`")


def _friendly(message: str) -> str:
    if message == "Extra inputs are not permitted":
        return "unknown setting"
    return message


def _origin(path: tuple[str, ...], from_env: set[tuple[str, ...]], file_path: str | None) -> str:
    env_path = ("runtime", *path[2:]) if path[:2] == ("streaming", "runtime") else path
    env_paths = {("runtime", *p[2:]) if p[:2] == ("streaming", "runtime") else p for p in from_env}
    if any(env_path[: len(p)] == p or p[: len(env_path)] == env_path for p in env_paths):
        return variable_name(path)
    if file_path:
        return f"{file_path}: {'.'.join(path)}"
    return variable_name(path)


def _derive_cluster(merged: dict[str, Any], env_map: Mapping[str, str]) -> list[str]:
    """StatefulSet mode: process id from the pod ordinal, addresses from the service.

    With ``LOOM_RUNTIME__PROCESS_ID_FROM_HOSTNAME=true``, pod ``orders-2`` of
    a StatefulSet ``orders`` with ``LOOM_RUNTIME__REPLICAS=3`` and headless
    service ``LOOM_RUNTIME__CLUSTER_SERVICE=orders-cluster`` gets
    ``process_id=2`` and ``addresses=orders-0.orders-cluster:2101,...``, so
    one manifest scales by changing ``replicas``.
    """
    runtime = (merged.get("streaming") or {}).get("runtime")
    if not isinstance(runtime, dict):
        return []
    cluster = {key: runtime.pop(key) for key in _CLUSTER_KEYS if key in runtime}
    if str(cluster.get("process_id_from_hostname", "false")).lower() not in ("true", "1", "yes"):
        return [
            f"{variable_name(('runtime', key))}: only used with "
            "LOOM_RUNTIME__PROCESS_ID_FROM_HOSTNAME=true"
            for key in cluster
            if key != "process_id_from_hostname"
        ]
    hostname = env_map.get("HOSTNAME") or socket.gethostname()
    match = re.fullmatch(r"(.+)-(\d+)", hostname)
    problems = []
    if match is None:
        problems.append(
            "LOOM_RUNTIME__PROCESS_ID_FROM_HOSTNAME: hostname "
            f"{hostname!r} is not a StatefulSet pod name (<name>-<ordinal>)"
        )
    try:
        replicas = int(cluster.get("replicas", ""))
        if replicas < 1:
            raise ValueError
    except ValueError:
        given = cluster.get("replicas")
        problems.append(
            "LOOM_RUNTIME__REPLICAS: the StatefulSet replica count (>= 1) is required"
            + (f", got {given!r} (k8s/: apply with kubectl apply -k)" if given else "")
        )
        replicas = 0
    service = cluster.get("cluster_service")
    if not service:
        problems.append("LOOM_RUNTIME__CLUSTER_SERVICE: the headless service name is required")
    port = cluster.get("cluster_port", 2101)
    if problems or match is None:
        return problems
    name, ordinal = match.group(1), int(match.group(2))
    runtime["process_id"] = ordinal
    runtime["addresses"] = [f"{name}-{i}.{service}:{port}" for i in range(replicas)]
    return []
