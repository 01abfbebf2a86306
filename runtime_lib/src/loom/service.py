"""Run a flow as a service configured only by environment variables.

A generated service's ``__main__`` is one line, ``serve(flow)``. This module
owns the process: JSON logs, settings from ``LOOM_*`` (exit code 2 with one
line per bad variable, before any connection), tracing from ``OTEL_*``,
graceful SIGTERM/SIGINT (drain, commit, exit 0; during the start-up wait for
the broker too), clear one-line errors for start-up problems such as an
unreachable broker or a missing topic (exit 1), and for a lost peer of a
Bytewax cluster (exit 3: restart every process).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from typing import Any, NoReturn

from loom.config.settings import LOG_LEVELS, SettingsError, describe, load_config
from loom.errors import ClusterPeerLostError, StartupError
from loom.observability import ObservabilityRuntime
from loom.observability.logs import configure_logging
from loom.streaming.bytewax.runner import StreamingRunner
from loom.streaming.compiler import logical_topics, unused_bindings
from loom.streaming.errors import FlowValidationError
from loom.streaming.nodes import StreamFlow

EXIT_OK = 0
EXIT_STARTUP = 1
EXIT_SETTINGS = 2
EXIT_PEER_LOST = 3

logger = logging.getLogger("loom.service")


def run_service(
    flow: StreamFlow[Any, Any],
    *,
    environ: Mapping[str, str] | None = None,
    sink_types: tuple[type, ...] = (),
    default_group_id: str | None = None,
) -> int:
    """Run ``flow`` until stopped; return the process exit code.

    ``default_group_id`` is the consumer group unless ``LOOM_KAFKA__GROUP_ID``
    (or the config file) names another; a generated service passes its own
    name. Without either, the service refuses to start (exit 2): there is no
    fallback group that unrelated services could end up sharing.
    """
    env = os.environ if environ is None else environ
    level = env.get("LOOM_LOG_LEVEL", "INFO").strip().upper()
    # An invalid level is reported with the other settings problems below.
    configure_logging(level=level if level in LOG_LEVELS else "INFO", static={"flow": flow.name})
    stop_requested = threading.Event()
    runner: StreamingRunner | None = None

    def on_signal(signum: int, frame: object) -> None:
        # A stop during start-up is honoured as soon as the runner exists.
        stop_requested.set()
        if runner is not None:
            runner.request_stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        config = load_config(
            environ=env,
            require_kafka=True,
            defaults={"kafka": {"group_id": default_group_id}} if default_group_id else None,
        )
    except SettingsError as exc:
        _print_problems(flow.name, "invalid settings", exc.problems)
        return EXIT_SETTINGS
    observability = ObservabilityRuntime.from_environment(
        flow.name, batch_span_ratio=config.observability.batch_span_ratio
    )
    try:
        runner = StreamingRunner.from_context(
            flow, config=config, observability_runtime=observability
        )
    except FlowValidationError as exc:
        unused = unused_bindings(logical_topics(flow), config.topics)
        _print_problems(flow.name, "invalid settings", [*unused, *exc.problems])
        return EXIT_SETTINGS
    unused = unused_bindings(runner.plan.logical_topics(), config.topics)
    if unused:
        _print_problems(flow.name, "invalid settings", unused)
        return EXIT_SETTINGS
    for sink_type in sink_types:
        runner.register_sink(sink_type)
    if stop_requested.is_set():
        return EXIT_OK
    delivery = config.kafka.delivery  # at-most-once also gets a warning from the transport
    logger.info(
        "starting with %s delivery (decided by %s), consumer group %s",
        delivery.guarantee,
        delivery.reason,
        config.kafka.group_id,
        extra={"topic": config.topics.get(flow.source.topic)},
    )
    try:
        runner.run()
    except SettingsError as exc:  # the client settings, checked by librdkafka itself
        _print_problems(flow.name, "invalid settings", describe(exc))
        return EXIT_SETTINGS
    except StartupError as exc:
        logger.error("cannot start: %s", exc)
        print(f"{flow.name}: cannot start: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except ClusterPeerLostError as exc:
        logger.error("%s", exc)
        print(f"{flow.name}: {exc}", file=sys.stderr)
        return EXIT_PEER_LOST
    finally:
        observability.shutdown()
    logger.info("stopped")
    return EXIT_OK


def serve(
    flow: StreamFlow[Any, Any],
    *,
    sink_types: tuple[type, ...] = (),
    default_group_id: str | None = None,
) -> NoReturn:
    """Entry point of a service: ``serve(flow)`` runs it and exits with its code.

    See :func:`run_service` for ``default_group_id``.
    """
    sys.exit(run_service(flow, sink_types=sink_types, default_group_id=default_group_id))


def _print_problems(name: str, headline: str, problems: list[str]) -> None:
    print(f"{name}: {headline}:", file=sys.stderr)
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
