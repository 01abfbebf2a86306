"""``copier copy`` of the defaults and of three variants, each checked as a team
would use it: rendered completely, statically valid containers and manifests,
installable from its declared runtime source, and passing its own lint, type
checks and test suite (including its integration test on the dev broker).

Only Python 3.11 runs here: the 3.12 variant is installed and tested on 3.11
(``--ignore-requires-python``) and its 3.12-specific settings are checked as
rendered.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from loom.config.context import KafkaSettings, ObservabilitySettings
from loom.config.settings import _CLUSTER_KEYS
from loom.streaming.bytewax.runner import BytewaxRecoverySettings, BytewaxRuntimeConfig
from tests.template.support import (
    REPO,
    ServiceVenv,
    bundled_wheel,
    compose_binary,
    git,
    manifest_files,
    render,
    run,
    runtime_version,
    tool,
    unrendered,
)

LONG_NAME = "customer-loyalty-points-ledger-projector"  # 40 characters: the maximum


@dataclass(frozen=True)
class Variant:
    id: str
    folder: str
    data: dict[str, Any] = field(default_factory=dict)

    def answer(self, name: str, default: Any) -> Any:
        return self.data.get(name, default)

    @property
    def service_name(self) -> str:
        return str(self.data.get("service_name", self.folder))

    @property
    def package_name(self) -> str:
        return str(self.data.get("package_name", self.service_name.replace("-", "_")))

    @property
    def python_version(self) -> str:
        return str(self.answer("python_version", "3.11"))

    @property
    def source(self) -> str:
        return str(self.answer("loom_runtime_source", "bundled"))

    @property
    def include_k8s(self) -> bool:
        return bool(self.answer("include_k8s", True))

    @property
    def async_backend(self) -> str:
        return str(self.answer("async_backend", "asyncio"))


VARIANTS = [
    # Every answer defaulted (the bundled runtime wheel); the service name
    # comes from the folder name.
    Variant("defaults", "orders-enricher"),
    Variant(
        "trio-path-no-k8s",
        "payments-router",
        {
            "service_name": "payments-router",
            "async_backend": "trio",
            "include_k8s": False,
            "loom_runtime_source": "path",
        },
    ),
    Variant(
        "py312-git-long-name",
        "loyalty",
        {
            "service_name": LONG_NAME,
            "package_name": "loyalty_ledger",
            "python_version": "3.12",
            "loom_runtime_source": "git",
            "team": "loyalty",
            "description": 'Projects "loyalty" points & ledgers \\ for <reporting>',
            "input_topic": "prod.loyalty.events.v1",
            "output_topic": "prod.loyalty.ledger.v1",
            "dlq_topic": "prod.loyalty.events.dlq",
        },
    ),
    Variant(
        "private-index-trio",
        "fraud-scorer",
        {
            "service_name": "fraud-scorer",
            "async_backend": "trio",
            "loom_runtime_source": "index",
            "loom_runtime_index_url": "https://pypi.internal.example/simple",
        },
    ),
]


@dataclass(frozen=True)
class Generated:
    path: Path
    variant: Variant
    template_repo: Path

    def read(self, relative: str) -> str:
        return (self.path / relative).read_text(encoding="utf-8")

    def yaml(self, relative: str) -> Any:
        return yaml.safe_load(self.read(relative))


@pytest.fixture(scope="session", params=VARIANTS, ids=[variant.id for variant in VARIANTS])
def generated(
    request: pytest.FixtureRequest, template_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Generated:
    variant: Variant = request.param
    destination = tmp_path_factory.mktemp(variant.id) / variant.folder
    render(template_repo, destination, variant.data)
    return Generated(destination, variant, template_repo)


# ---------------------------------------------------------------- rendering


def test_nothing_is_left_unrendered(generated: Generated) -> None:
    assert unrendered(generated.path) == []


def test_the_answers_file_records_the_release_and_every_answer(
    generated: Generated, release_tag: str
) -> None:
    answers = generated.yaml(".copier-answers.yml")
    variant = generated.variant
    assert answers["_commit"] == release_tag
    assert answers["_src_path"] == str(generated.template_repo)
    assert answers["service_name"] == variant.service_name
    assert answers["package_name"] == variant.package_name
    assert answers["loom_runtime_version"] == runtime_version()
    for name, value in variant.data.items():
        assert answers[name] == value, name
    # Computed values are not answers: they follow the template on update.
    assert not {"template_runtime_version", "base_image", "metrics_port"} & set(answers)


def test_the_python_version_is_applied_everywhere(generated: Generated) -> None:
    version = generated.variant.python_version
    pyproject = tomllib.loads(generated.read("pyproject.toml"))
    assert pyproject["project"]["requires-python"] == f">={version}"
    assert pyproject["tool"]["ruff"]["target-version"] == "py3" + version.split(".")[1]
    assert pyproject["tool"]["mypy"]["python_version"] == version
    assert re.search(
        rf"^ARG BASE_IMAGE=python:{re.escape(version)}\.\d+-slim-\w+$",
        generated.read("Dockerfile"),
        re.M,
    )
    workflow = generated.yaml(".github/workflows/ci.yml")
    setups = [
        step["with"]["python-version"]
        for job in workflow["jobs"].values()
        for step in job["steps"]
        if step.get("uses", "").startswith("actions/setup-python")
    ]
    assert setups
    assert set(setups) == {version}


def test_the_runtime_is_pinned_and_resolved_from_the_chosen_source(generated: Generated) -> None:
    variant = generated.variant
    version = runtime_version()
    pyproject = tomllib.loads(generated.read("pyproject.toml"))
    extra = "uvloop" if variant.async_backend == "asyncio" else "trio"
    assert f"loom-runtime[{extra}]=={version}" in pyproject["project"]["dependencies"]
    dev = pyproject["project"]["optional-dependencies"]["dev"]
    assert f"loom-runtime[dev]=={version}" in dev
    # The README tells the team to run `copier update`: the kit's own copier.
    kit_dev = tomllib.loads((REPO / "pyproject.toml").read_text())["dependency-groups"]["dev"]
    [kit_copier] = [pin for pin in kit_dev if pin.startswith("copier==")]
    assert kit_copier in dev
    assert pyproject["project"]["scripts"] == {
        variant.service_name: f"{variant.package_name}.__main__:main"
    }
    lines = [
        line
        for line in generated.read("requirements-runtime.txt").splitlines()
        if line and not line.startswith("#")
    ]
    runtime_wheels = sorted(path.name for path in (generated.path / "wheels").glob("*.whl"))
    if variant.source == "bundled":
        wheel = generated.path / "wheels" / bundled_wheel(version)
        assert runtime_wheels == [wheel.name]
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        assert lines == [f"file:wheels/{wheel.name}#sha256={digest}"]
        # Committed with the service: git sees the wheel, the .gitignore keeps it in.
        status = git(
            "status", "--porcelain", "--untracked-files=all", "--", "wheels", cwd=generated.path
        )
        assert f"?? wheels/{wheel.name}" in status.splitlines()
    elif variant.source == "index":
        # The private index is the only one: never --extra-index-url.
        index = variant.data["loom_runtime_index_url"]
        assert lines == [f"--index-url {index}", f"loom-runtime=={version}"]
    elif variant.source == "git":
        url = f"file://{generated.template_repo}"
        subdirectory = "#subdirectory=runtime_lib"
        assert lines == [f"loom-runtime @ git+{url}@v{version}{subdirectory}"]
    else:
        assert lines == [f"-e {generated.template_repo / 'runtime_lib'}"]
    if variant.source != "bundled":
        assert runtime_wheels == []


def tampered(wheel: Path) -> None:
    """Rewrite ``wheel`` as a valid wheel of the same name with one more module."""
    original = wheel.read_bytes()
    with zipfile.ZipFile(io.BytesIO(original)) as source, zipfile.ZipFile(wheel, "w") as target:
        for item in source.infolist():
            target.writestr(item, source.read(item))
        target.writestr("loom/injected.py", "print('not the runtime of the template')\n")


def test_the_bundled_wheel_is_reproducible_and_pip_installs_only_those_bytes(
    template_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same runtime source gives the same wheel (``copier update`` renders the
    previous release again and compares), pip installs it without any index, and
    refuses a wheel of the same name with other contents."""
    name = bundled_wheel(runtime_version())
    first = render(template_repo, tmp_path / "one" / "orders-enricher", {})
    # Another directory, other file times, and SOURCE_DATE_EPOCH (which the task clears).
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    second = render(template_repo, tmp_path / "two" / "orders-enricher", {})
    assert (first / "wheels" / name).read_bytes() == (second / "wheels" / name).read_bytes()

    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index"]
    accepted = run([*pip, "-r", "requirements-runtime.txt"], cwd=first)
    assert f"Would install loom-runtime-{runtime_version()}" in accepted.stdout
    tampered(first / "wheels" / name)
    refused = run([*pip, "-r", "requirements-runtime.txt"], cwd=first, check=False)
    assert refused.returncode != 0
    assert "THESE PACKAGES DO NOT MATCH THE HASHES" in refused.stderr, refused.stderr


def test_the_example_flow_reads_its_topics_from_the_environment(generated: Generated) -> None:
    variant = generated.variant
    env_example = generated.read(".env.example")
    for logical in ("input", "output", "dlq"):
        topic = variant.answer(f"{logical}_topic", f"{variant.service_name}.{logical}")
        assert f"LOOM_TOPICS__{logical.upper()}={topic}\n" in env_example
    assert f"LOOM_RUNTIME__ASYNC_BACKEND={variant.async_backend}\n" in env_example
    flow = generated.read(f"src/{variant.package_name}/flow.py")
    assert 'FromTopic("input", payload=Order)' in flow
    assert 'errors=IntoTopic("dlq")' in flow


def runtime_variables() -> set[str]:
    """Every LOOM_* variable the installed runtime reads (from its settings models)."""
    names = {f"LOOM_KAFKA__{name.upper()}" for name in KafkaSettings.model_fields}
    names |= {f"LOOM_OBSERVABILITY__{name.upper()}" for name in ObservabilitySettings.model_fields}
    runtime = [f.name for f in msgspec.structs.fields(BytewaxRuntimeConfig) if f.name != "recovery"]
    names |= {f"LOOM_RUNTIME__{name.upper()}" for name in [*runtime, *_CLUSTER_KEYS]}
    recovery = msgspec.structs.fields(BytewaxRecoverySettings)
    names |= {f"LOOM_RUNTIME__RECOVERY__{f.name.upper()}" for f in recovery}
    return names | {"LOOM_CONFIG_FILE", "LOOM_LOG_LEVEL"}


def test_env_example_documents_every_setting_of_the_runtime(generated: Generated) -> None:
    documented = set(re.findall(r"^#? ?((?:LOOM|OTEL)_\w+)=", generated.read(".env.example"), re.M))
    assert runtime_variables() - documented == set()
    assert {"LOOM_TOPICS__INPUT", "LOOM_TOPICS__OUTPUT", "LOOM_TOPICS__DLQ"} <= documented
    assert {"OTEL_SERVICE_NAME", "OTEL_EXPORTER_OTLP_ENDPOINT"} <= documented


# ---------------------------------------------------------------- containers


def dockerfile_stages(text: str) -> list[list[str]]:
    """Instructions (continuation lines joined) per stage; stage 0 is the preamble."""
    logical, current = [], ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            logical.append(current.strip())
            current = ""
    stages: list[list[str]] = [[]]
    for instruction in logical:
        if instruction.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(instruction)
    return stages


def test_the_dockerfile_passes_hadolint_and_has_the_essentials(generated: Generated) -> None:
    run([tool("hadolint"), "--failure-threshold", "info", "Dockerfile"], cwd=generated.path)
    text = generated.read("Dockerfile")
    preamble, build, final = dockerfile_stages(text)
    # A pinned base (exact patch version), shared by both stages, overridable.
    [base] = [i for i in preamble if i.startswith("ARG BASE_IMAGE=")]
    assert re.fullmatch(r"ARG BASE_IMAGE=python:3\.1[12]\.\d+-slim-bookworm", base)
    assert build[0] == "FROM ${BASE_IMAGE} AS build"
    assert final[0] == "FROM ${BASE_IMAGE} AS runtime"
    # The package index is a build argument; wheels/ serves offline builds.
    for argument in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_FIND_LINKS"):
        assert f"ARG {argument}" in build
    [install] = [i for i in build if "pip --python /opt/service/bin/python install" in i]
    assert "--find-links /build/wheels" in install
    assert (generated.path / "wheels/README.md").exists()
    # loom-runtime as in development and CI: bundled, with every dependency from
    # the lock in hash-checking mode, then the service alone; through
    # requirements-runtime.txt when the build can reach its index; else the
    # wheel CI builds first.
    source = generated.variant.source
    if source == "bundled":
        copy = "COPY requirements-runtime.txt requirements.lock.txt pyproject.toml README.md ./"
        assert copy in build
        assert " --require-hashes -r requirements.lock.txt && " in install
        assert install.endswith(" --no-deps /build")
    else:
        assert "COPY requirements-runtime.txt pyproject.toml README.md ./" in build
    if source == "bundled":
        assert "!requirements.lock.txt" in generated.read(".dockerignore").splitlines()
    elif source == "index":
        assert install.endswith(" -r requirements-runtime.txt /build")
    else:
        assert install.endswith(f" /build/wheels/{bundled_wheel(runtime_version())} /build")
    # The final stage: the venv only, an unprivileged user, health, PID 1.
    assert [i for i in final if i.startswith(("COPY", "ADD"))] == [
        "COPY --from=build /opt/service /opt/service"
    ]
    assert not any(
        re.search(r"pip|apt-get|gcc|build-essential", i) for i in final if i.startswith("RUN")
    )
    [user] = [i for i in final if i.startswith("USER ")]
    assert user == "USER 10001:10001"
    [health] = [i for i in final if i.startswith("HEALTHCHECK ")]
    assert "/healthz" in health
    assert 'CMD ["python", "-c",' in health
    [entrypoint] = [i for i in final if i.startswith("ENTRYPOINT ")]
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT ")) == [generated.variant.service_name]
    assert "STOPSIGNAL SIGTERM" in final
    ignored = generated.read(".dockerignore").splitlines()
    assert ignored[ignored.index("*") :][:1] == ["*"]  # everything not listed stays out
    assert {"!requirements-runtime.txt", "!wheels/"} <= set(ignored)


def test_the_compose_file_is_valid_and_complete(generated: Generated) -> None:
    run([compose_binary(), "config", "--quiet"], cwd=generated.path)
    run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
        cwd=generated.path,
    )
    variant = generated.variant
    compose = generated.yaml("docker-compose.yml")
    services = compose["services"]
    assert set(services) == {
        "kafka",
        "topics",
        variant.service_name,
        "jaeger",
        "prometheus",
        "grafana",
    }
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert kafka["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft
    assert "healthcheck" in kafka
    topics = services["topics"]
    assert topics["depends_on"] == {"kafka": {"condition": "service_healthy"}}
    script = topics["command"][0]
    for logical in ("input", "output", "dlq"):
        assert variant.answer(f"{logical}_topic", f"{variant.service_name}.{logical}") in script
    service = services[variant.service_name]
    assert service["build"]["context"] == "."
    assert service["depends_on"]["topics"] == {"condition": "service_completed_successfully"}
    environment = service["environment"]
    assert environment["LOOM_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:29092"
    # Nothing about commits: at-least-once and the service's own group are defaults.
    assert "LOOM_KAFKA__CONSUMER" not in environment
    assert "LOOM_KAFKA__GROUP_ID" not in environment
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    port = environment["LOOM_OBSERVABILITY__PROMETHEUS_PORT"]
    prometheus = generated.yaml("observability/prometheus.yml")
    [job] = prometheus["scrape_configs"]
    assert job["static_configs"][0]["targets"] == [f"{variant.service_name}:{port}"]
    mounts = services["prometheus"]["volumes"]
    assert mounts == [
        "./observability/prometheus.yml:/etc/prometheus/prometheus.yml:ro",
        "./observability/alerts.yml:/etc/prometheus/alerts.yml:ro",
    ]
    # The stack's Prometheus evaluates the service's alert rules.
    assert prometheus["rule_files"] == ["/etc/prometheus/alerts.yml"]
    # Grafana: the generated dashboard on the stack's Prometheus, provisioned read-only.
    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
    for mount in grafana["volumes"]:
        source, _, mode = mount.split(":")
        assert (generated.path / source).is_file(), source
        assert mode == "ro"
    [datasource] = generated.yaml("observability/grafana/datasources.yml")["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    [provider] = generated.yaml("observability/grafana/dashboards.yml")["providers"]
    dashboards = {target for mount in grafana["volumes"] for target in [mount.split(":")[1]]}
    assert f"{provider['options']['path']}/service.json" in dashboards


def test_the_ci_workflow_and_dependabot_config_are_valid(generated: Generated) -> None:
    check = tool("check-jsonschema")
    run(
        [check, "--builtin-schema", "vendor.github-workflows", ".github/workflows/ci.yml"],
        cwd=generated.path,
    )
    run(
        [check, "--builtin-schema", "vendor.dependabot", ".github/dependabot.yml"],
        cwd=generated.path,
    )
    workflow = generated.yaml(".github/workflows/ci.yml")
    steps = [step.get("run", "") for job in workflow["jobs"].values() for step in job["steps"]]
    for command in ("ruff check .", "ruff format --check .", "mypy", "pytest", "docker build"):
        assert any(command in step for step in steps), command
    if generated.variant.source == "bundled":
        [install] = [step for step in steps if "--require-hashes" in step]
        assert "pip install --require-hashes -r requirements-dev.lock.txt" in install
        assert "pip install --no-deps -e ." in install
        dependabot = generated.yaml(".github/dependabot.yml")
        assert "pip" in {update["package-ecosystem"] for update in dependabot["updates"]}
    else:
        assert any('pip install -r requirements-runtime.txt -e ".[dev]"' in s for s in steps)
    # Only a git or path source needs its wheel built for the image; bundled is committed.
    source = generated.variant.source
    wheel_steps = [step for step in steps if "pip wheel" in step]
    assert len(wheel_steps) == (1 if source in ("git", "path") else 0)
    index = generated.variant.data.get("loom_runtime_index_url")
    assert workflow.get("env", {}).get("PIP_INDEX_URL") == index


def test_the_kubernetes_manifests_validate_against_the_schemas(generated: Generated) -> None:
    k8s = generated.path / "k8s"
    if not generated.variant.include_k8s:
        assert not k8s.exists()
        return
    files = manifest_files(generated.path)
    run([tool("kubernetes-validate"), "--strict", "--quiet", *files], cwd=generated.path)
    documents = {
        f"{doc['kind']}/{doc['metadata']['name']}": doc
        for path in files
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8"))
    }
    name = generated.variant.service_name
    assert set(documents) == {
        f"StatefulSet/{name}",
        f"Service/{name}-cluster",
        f"Service/{name}-metrics",
        f"ConfigMap/{name}",
        f"PodDisruptionBudget/{name}",
        f"NetworkPolicy/{name}",
        # The Prometheus Operator's: kubernetes-validate has no schema for them
        # (it warns and skips); tests/template/test_kubernetes.py checks them.
        f"ServiceMonitor/{name}",
        f"PrometheusRule/{name}",
    }
    spec = documents[f"StatefulSet/{name}"]["spec"]
    assert spec["serviceName"] == f"{name}-cluster"
    assert spec["podManagementPolicy"] == "Parallel"
    headless = documents[f"Service/{name}-cluster"]["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is True
    [container] = spec["template"]["spec"]["containers"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["LOOM_RUNTIME__PROCESS_ID_FROM_HOSTNAME"] == "true"
    assert not env["LOOM_RUNTIME__REPLICAS"].isdigit()  # copied from spec.replicas (-k)
    sources = container["envFrom"]
    assert sources[0] == {"configMapRef": {"name": name}}
    assert sources[1]["secretRef"]["name"] == f"{name}-kafka"
    assert spec["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


# ---------------------------------------------------------------- the service itself


def install(generated: Generated, environment: ServiceVenv, wheelhouse: Path) -> None:
    """Install the service (and loom-runtime from its declared source), as its README says."""
    variant = generated.variant
    options: list[str | Path] = ["--quiet"]
    if variant.source in ("bundled", "index"):
        # No index: a bundled runtime needs none, and for the index source the
        # wheelhouse stands in for the private index. The wheelhouse also has
        # the service's build backend (the runtime's dependencies are installed).
        options += ["--no-index", "--find-links", wheelhouse]
    if variant.python_version != "3.11":
        options.append("--ignore-requires-python")
    environment.pip("uninstall", "--yes", "loom-runtime", *environment.installed)
    environment.pip(
        "install", *options, "-r", "requirements-runtime.txt", "-e", ".[dev]", cwd=generated.path
    )
    environment.installed.append(variant.service_name)


def installed_runtime(environment: ServiceVenv) -> dict[str, Any]:
    """Version and origin (PEP 610 direct_url.json) of the installed loom-runtime."""
    script = (
        "import json, importlib.metadata as m; d = m.distribution('loom-runtime'); "
        "print(json.dumps({'version': d.version, 'direct_url': json.loads("
        "d.read_text('direct_url.json') or 'null')}))"
    )
    found: dict[str, Any] = json.loads(
        run([environment.python, "-c", script], env=environment.env()).stdout
    )
    return found


def test_the_service_installs_and_passes_its_checks_and_its_own_tests(
    generated: Generated, service_venv: ServiceVenv, wheelhouse: Path
) -> None:
    variant = generated.variant
    install(generated, service_venv, wheelhouse)

    runtime = installed_runtime(service_venv)
    assert runtime["version"] == runtime_version()
    origin = runtime["direct_url"]
    if variant.source == "bundled":
        # The committed wheel (not the wheelhouse's loom-runtime), checked by its hash.
        wheel = generated.path / "wheels" / bundled_wheel(runtime_version())
        assert origin["url"].endswith(f"/wheels/{wheel.name}")
        assert origin["archive_info"]["hashes"] == {
            "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()
        }
    elif variant.source == "index":
        assert origin is None  # from the index (here: the wheelhouse)
    elif variant.source == "git":
        assert origin["vcs_info"]["requested_revision"] == f"v{runtime_version()}"
    else:
        assert origin["dir_info"] == {"editable": True}
        assert origin["url"] == (generated.template_repo / "runtime_lib").as_uri()
    # The console script runs the service; without its settings it stops before any I/O.
    script = service_venv.bin / variant.service_name
    unconfigured = run([script], env=service_venv.env(), check=False, timeout=60)
    assert unconfigured.returncode == 2, unconfigured.stderr
    assert "LOOM_KAFKA__BOOTSTRAP_SERVERS is required" in unconfigured.stderr

    path = generated.path
    service_venv.run("ruff", "check", ".", cwd=path)
    service_venv.run("ruff", "format", "--check", ".", cwd=path)
    service_venv.run("mypy", "--cache-dir", service_venv.mypy_cache, cwd=path)
    package = variant.package_name
    service_venv.run(
        "loom", "graph", f"{package}.flow:flow", "--readme", "README.md", "--check", cwd=path
    )
    output = service_venv.run("python", "-m", "pytest", "-p", "no:cacheprovider", cwd=path)
    # Flow, README diagram, service process, deployment files (k8s/ too where
    # rendered): every test ran and passed, none skipped, none expected to fail.
    [summary] = re.findall(r"^=+ (.*) in [0-9.]+s\b.*=+$", output, re.M)
    assert re.fullmatch(r"\d+ passed", summary), output
