"""StreamingRunner — production Bytewax runtime entry point for Loom flows."""

from __future__ import annotations

import contextlib
import contextvars
import gc
import logging
import re
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.run import cli_main
from opentelemetry.trace import Status, StatusCode

from loom.config.context import ConfigContext
from loom.config.runtime import BytewaxRecoverySettings, BytewaxRuntimeConfig
from loom.delivery.transport import Transport
from loom.errors import ClusterPeerLostError, ConfigPathError, LoomError, StartupError
from loom.observability import ObservabilityRuntime, Scope
from loom.observability.server import ProbeServer
from loom.streaming.bytewax.adapter import DataflowBuilder, missing_operators
from loom.streaming.bytewax.bridge import AsyncBridge
from loom.streaming.bytewax.state import MemoryStateStore, SqliteStateStore, StateStore
from loom.streaming.bytewax.worker import CommitPolicy, RunState, SourceSettings
from loom.streaming.compiler import compile_flow
from loom.streaming.errors import ErrorEnvelope, ErrorKind, FlowValidationError
from loom.streaming.nodes import StreamFlow
from loom.streaming.plan import FlowPlan, NamedSinkPlan
from loom.streaming.sinks import SinkRegistry

logger = logging.getLogger("loom.runner")

__all__ = [
    "BytewaxRecoverySettings",
    "BytewaxRuntimeConfig",
    "ErrorSink",
    "StreamingRunner",
]


class ErrorSink(Protocol):
    """Bytewax sink protocol for ErrorEnvelope items.

    Any ``bytewax.outputs.DynamicSink`` whose partitions accept
    :class:`ErrorEnvelope` items satisfies it.
    """

    def build(
        self, step_id: str, worker_index: int, worker_count: int
    ) -> StatelessSinkPartition[ErrorEnvelope]: ...


class _PreparedStreamingRun(NamedTuple):
    """Prepared Bytewax execution bundle."""

    dataflow: Dataflow
    shutdown: Callable[[], None]


def _to_timedelta(value_ms: int | None) -> timedelta | None:
    """Milliseconds as a ``timedelta``; ``None`` stays ``None``."""
    return None if value_ms is None else timedelta(milliseconds=value_ms)


def _recovery_config(recovery: BytewaxRecoverySettings | None) -> RecoveryConfig | None:
    """Bytewax's ``RecoveryConfig`` for the settings, or ``None`` when disabled."""
    if recovery is None:
        return None
    backup = _to_timedelta(recovery.backup_interval_ms)
    return RecoveryConfig(Path(recovery.db_dir), backup)  # type: ignore[no-untyped-call]


def _runtime_kwargs(runtime: BytewaxRuntimeConfig) -> dict[str, Any]:
    """Keyword arguments of ``bytewax.run.cli_main`` for ``runtime``."""
    return {
        "workers_per_process": runtime.workers_per_process,
        "process_id": runtime.process_id,
        "addresses": None if runtime.addresses is None else list(runtime.addresses),
        "epoch_interval": _to_timedelta(runtime.epoch_interval_ms),
        "recovery_config": _recovery_config(runtime.recovery),
    }


def _ensure_recovery_partitions(runtime: BytewaxRuntimeConfig) -> None:
    """Create Bytewax's recovery partitions on first start.

    Bytewax refuses to run with an empty recovery directory; a service
    should not need a separate init step. Only the first process of a
    cluster creates them (one per worker of the cluster); an existing
    directory with partitions is left alone.
    """
    recovery = runtime.recovery
    if recovery is None or runtime.process_id not in (None, 0):
        return
    db_dir = Path(recovery.db_dir)
    if db_dir.is_dir() and any(db_dir.iterdir()):
        return
    db_dir.mkdir(parents=True, exist_ok=True)
    init_db_dir(db_dir, _cluster_workers(runtime))  # type: ignore[no-untyped-call]


def _cluster_workers(runtime: BytewaxRuntimeConfig) -> int:
    """Workers of the whole cluster: every process runs ``workers_per_process``."""
    return runtime.workers_per_process * max(1, len(runtime.addresses or ()))


def _peers(runtime: BytewaxRuntimeConfig) -> list[tuple[int, str]]:
    """The other processes of this process's cluster: ``(process id, address)``."""
    addresses = runtime.addresses or ()
    return [(i, address) for i, address in enumerate(addresses) if i != runtime.process_id]


def _peer_lost_message(runtime: BytewaxRuntimeConfig) -> str:
    """One line naming the peer (or the peers it can be among) that was lost.

    A surviving process only sees its connections drop; with more than two
    processes it cannot tell which peer went first, so it names them all.
    """
    peers = ", ".join(f"process {i} at {address}" for i, address in _peers(runtime))
    which = peers if len(_peers(runtime)) == 1 else f"one of {peers}"
    return (
        f"lost the Bytewax cluster peer {which} (stopped or unreachable); process "
        f"{runtime.process_id} stops too: restart every process of the cluster"
    )


def _create_bridge(plan: FlowPlan, runtime: BytewaxRuntimeConfig) -> AsyncBridge | None:
    """Create an AsyncBridge configured from runtime settings, or None if not needed."""
    if not plan.has_async:
        return None
    bridge = AsyncBridge(
        runtime.async_backend,
        use_uvloop=runtime.use_uvloop,
        force_shutdown_timeout_ms=runtime.force_shutdown_timeout_ms,
    )
    bridge.start()
    return bridge


def _prepare_run(
    plan: FlowPlan,
    *,
    source: Transport,
    sink: Transport,
    error_sinks: Mapping[ErrorKind, DynamicSink[Any]] | None = None,
    named_sinks: Mapping[str, DynamicSink[Any]] | None = None,
    bridge: AsyncBridge | None = None,
    run_state: RunState | None = None,
    observability: ObservabilityRuntime | None = None,
    recovery: bool = False,
) -> _PreparedStreamingRun:
    """Build the dataflow of ``plan`` on the given transports, plus its shutdown."""
    run = run_state or RunState()
    dataflow = DataflowBuilder(
        plan,
        source=source,
        sink=sink,
        named_sinks=named_sinks or {},
        error_sinks=error_sinks or {},
        bridge=bridge,
        run=run,
        observability=observability,
        recovery=recovery,
    ).build()

    def shutdown() -> None:
        run.stop.set()
        if bridge is not None:
            # The drain already waited force_shutdown_timeout_ms if it gave up.
            bridge.close(abandon=run.abandoned)
        if run.store is not None:
            run.store.close()

    return _PreparedStreamingRun(dataflow, shutdown)


@contextlib.contextmanager
def _relaxed_gc() -> Iterator[None]:
    """Collect cycles rarely while records flow.

    Every record in flight holds a few container objects until its delivery
    is confirmed; with default thresholds the cyclic collector walks all of
    them thousands of times per second (measured: ~40% of a worker's CPU)
    and finds nothing, since records form no cycles. Start-up objects are
    frozen out of its view and the young generation is collected every
    50,000 allocations instead of 700; the oldest still every ~10 million,
    so cyclic garbage a step may create (exceptions with tracebacks) stays
    bounded.
    """
    previous = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 10)
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


class _StoppedBeforeStart(LoomError):
    """Internal: a stop arrived while Bytewax was still forming its cluster."""


def _run_beside_signals(execute: Callable[[], None], *, abandon_when: Callable[[], bool]) -> None:
    """Run ``execute`` (the blocking ``cli_main``) so that signals are seen at once.

    Python runs signal handlers on the main thread only, between bytecodes.
    While ``cli_main`` blocks the main thread in Rust (a process waiting for
    the peers of its cluster runs no Python code at all), a SIGTERM would
    wait until it returns. So, on the main thread, Bytewax runs on a helper
    thread while the main thread waits in Python, and a stop requested before
    any worker started (``abandon_when``) raises :class:`_StoppedBeforeStart`:
    nothing was read, so nothing is lost by leaving Bytewax behind (the
    process is about to exit). Elsewhere ``execute`` runs in place.
    """
    if threading.current_thread() is not threading.main_thread():
        execute()
        return
    failure: list[BaseException] = []
    context = contextvars.copy_context()  # the current span stays the parent of what runs

    def target() -> None:
        try:
            context.run(execute)
        except BaseException as exc:  # re-raised on the main thread
            failure.append(exc)

    thread = threading.Thread(target=target, name="loom-bytewax", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(_SIGNAL_WAIT_S)
        if thread.is_alive() and abandon_when():
            raise _StoppedBeforeStart
    if failure:
        raise failure[0]


_SIGNAL_WAIT_S = 0.1
"""How long the main thread waits between looks at a stop request."""


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Turn SIGTERM/SIGINT into a graceful drain instead of an abort.

    Only the main thread may install handlers; elsewhere this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(signum: int, frame: object) -> None:
        stop()

    for sig in previous:
        signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StreamingRunner:
    """Wire a StreamFlow declaration into the real Bytewax runtime.

    :param _registry: Optional pre-built SinkRegistry for testing purposes.
    """

    def __init__(self, *, _registry: SinkRegistry | None = None) -> None:
        self._registry = _registry if _registry is not None else SinkRegistry()
        self._flow: StreamFlow[Any, Any] | None = None
        self._config: ConfigContext | None = None
        self._plan: FlowPlan | None = None
        self._observability = ObservabilityRuntime()
        self._transport: Transport | None = None
        self._runtime_override: BytewaxRuntimeConfig | None = None
        self._prepared: _PreparedStreamingRun | None = None
        self._run_state: RunState | None = None
        self._stop = threading.Event()
        self._volatile_state: MemoryStateStore | None = None
        self._clock: Callable[[], float] | None = None
        self.probe_port: int | None = None
        """The port /metrics is served on during run() (resolved if 0 was configured)."""

    # -- construction -----------------------------------------------------

    @classmethod
    def from_context(
        cls,
        flow: StreamFlow[Any, Any],
        *,
        config: ConfigContext,
        observability_runtime: ObservabilityRuntime | None = None,
    ) -> StreamingRunner:
        """Build a runner from a resolved config context."""
        runner = cls()
        runner._configure(flow, config)
        if observability_runtime is not None:
            runner._observability = observability_runtime
        return runner

    @classmethod
    def from_yaml(
        cls,
        flow: StreamFlow[Any, Any],
        path: str | Path,
        *,
        observability_runtime: ObservabilityRuntime | None = None,
    ) -> StreamingRunner:
        """Load config from YAML and build a runner."""
        config = ConfigContext.from_yaml(path)
        return cls.from_context(flow, config=config, observability_runtime=observability_runtime)

    @classmethod
    def from_dict(
        cls,
        flow: StreamFlow[Any, Any],
        config: Mapping[str, Any],
        *,
        observability_runtime: ObservabilityRuntime | None = None,
    ) -> StreamingRunner:
        """Build a runner from a plain Python config mapping."""
        context = ConfigContext.from_dict(config)
        return cls.from_context(flow, config=context, observability_runtime=observability_runtime)

    def _configure(self, flow: StreamFlow[Any, Any], config: ConfigContext) -> None:
        plan = compile_flow(flow, config)
        missing = missing_operators(plan)
        if missing:  # a node type registered without its operator: refuse it now
            raise FlowValidationError(flow.name, missing)
        self._plan = plan
        self._flow = flow
        self._config = config

    def use_transport(self, transport: Transport) -> None:
        """Run on ``transport`` instead of Kafka.

        ``loom.streaming.testing.TestRunner`` passes its in-memory transport;
        a test may pass a double of its own (see :mod:`loom.delivery.transport`).
        """
        self._transport = transport

    @property
    def plan(self) -> FlowPlan:
        if self._plan is None:
            raise RuntimeError("the runner has no flow; build it with from_context/from_yaml")
        return self._plan

    @property
    def config(self) -> ConfigContext:
        if self._config is None:
            raise RuntimeError("the runner has no config; build it with from_context/from_yaml")
        return self._config

    def register_sink(self, sink_class: type) -> None:
        """Register a sink class to be resolved from YAML config at run time.

        :raises TypeError: If sink_class does not implement RegisteredSink.
        """
        self._registry.register(sink_class)

    # -- execution --------------------------------------------------------

    def build_dataflow(self) -> Dataflow:
        """Assemble the Bytewax Dataflow and keep shutdown state."""
        return self.prepare_run().dataflow

    def prepare_run(
        self, *, error_sinks: Mapping[ErrorKind, ErrorSink] | None = None
    ) -> _PreparedStreamingRun:
        """Prepare one executable dataflow and its shutdown callable.

        Releases any resources from a previous ``prepare_run()`` call first,
        so calling it twice is safe. ``error_sinks`` override the plan's error
        routes for their kinds.
        """
        self.shutdown()
        plan = self.plan
        runtime = self._runtime()
        named_sinks = {
            terminal.name: self._registry.build(terminal.sink_type, terminal.options)
            for terminal in plan.sink_terminals()
            if isinstance(terminal, NamedSinkPlan)
        }
        transport = self._transport = self._transport or self._kafka_transport()
        bridge = _create_bridge(plan, runtime)
        run_state = RunState(
            self._source_settings(runtime),
            expected_workers=runtime.workers_per_process,
            recovery=runtime.recovery is not None,
            store=self._state_store(runtime),
            clock=self._clock,
        )
        try:
            prepared = _prepare_run(
                plan,
                source=transport,
                sink=transport,
                error_sinks=dict(error_sinks or {}),  # type: ignore[arg-type]
                named_sinks=named_sinks,
                bridge=bridge,
                run_state=run_state,
                observability=(
                    self._observability if self._observability.instrument_dataflow else None
                ),
                recovery=runtime.recovery is not None,
            )
        except BaseException:
            if bridge is not None:
                bridge.close()
            raise
        self._prepared, self._run_state = prepared, run_state
        if self._stop.is_set():  # a stop requested while starting
            run_state.stop.set()
        return prepared

    def run(
        self,
        *,
        flow: StreamFlow[Any, Any] | None = None,
        config: ConfigContext | None = None,
        config_path: str | Path | None = None,
        error_sinks: Mapping[ErrorKind, Any] | None = None,
        runtime: BytewaxRuntimeConfig | None = None,
    ) -> None:
        """Execute the compiled dataflow with the real Bytewax runtime.

        Emits ``Scope.POLL_CYCLE`` around the full invocation (including
        preparation) and ``Scope.FLOW`` around the blocking ``cli_main`` call.
        """
        tracer = self._observability.tracer
        target = flow or self._flow
        name = target.name if target is not None else "unconfigured"
        with tracer.start_as_current_span(
            f"{Scope.POLL_CYCLE.value} {name}",
            attributes={"loom.scope": Scope.POLL_CYCLE.value, "loom.flow": name},
            record_exception=True,
            set_status_on_exception=True,
        ) as cycle:
            if config_path is not None:
                config = ConfigContext.from_yaml(config_path)
            if flow is not None or config is not None:
                self._configure(flow or self._require_flow(), config or self.config)
            self._runtime_override = runtime
            try:
                prepared = self.prepare_run(error_sinks=error_sinks)
                assert self._run_state is not None
                assert self._transport is not None
                plan = self.plan
                self._transport.preflight(
                    plan.source.binding.physical, plan.sink_topics(), self._stop
                )
                if self._stop.is_set():  # stopped while waiting for the broker
                    return
                cycle.set_attribute("loom.node_count", self.plan.node_count)
                with self._probe_server(self._run_state):
                    self._execute(prepared, self._runtime(), self._run_state)
            finally:
                self._runtime_override = None
                self._stop.clear()
                self.shutdown()

    def _execute(
        self, prepared: _PreparedStreamingRun, runtime: BytewaxRuntimeConfig, run: RunState
    ) -> None:
        tracer = self._observability.tracer
        name = self.plan.name
        with tracer.start_as_current_span(
            f"{Scope.FLOW.value} {name}",
            attributes={
                "loom.scope": Scope.FLOW.value,
                "loom.flow": name,
                "loom.node_count": self.plan.node_count,
                "loom.workers_per_process": runtime.workers_per_process,
            },
            record_exception=True,
            set_status_on_exception=True,
        ) as span:
            _ensure_recovery_partitions(runtime)

            def execute() -> None:
                cli_main(prepared.dataflow, **_runtime_kwargs(runtime))  # type: ignore[no-untyped-call]

            def nothing_started() -> bool:
                return self._stop.is_set() and not run.workers()

            if _peers(runtime):
                logger.info(
                    "joining the Bytewax cluster as process %s of %d",
                    runtime.process_id,
                    len(runtime.addresses or ()),
                )
            try:
                with _stop_on_signals(self.request_stop), _relaxed_gc():
                    _run_beside_signals(execute, abandon_when=nothing_started)
            except _StoppedBeforeStart:
                logger.info("stopped before any worker started (nothing was read)")
                return
            except Exception:
                if not run.stopped_gracefully:
                    raise
                # A drained recovery run ends by aborting (see RunState).
            except BaseException as exc:
                # Bytewax's communication threads panic when a peer's
                # connection drops; the panic reaches Python as pyo3's
                # PanicException, a BaseException.
                if type(exc).__name__ != "PanicException" or not _peers(runtime):
                    raise
                raise ClusterPeerLostError(_peer_lost_message(runtime)) from None
            span.set_status(Status(StatusCode.OK))

    @contextlib.contextmanager
    def _probe_server(self, run: RunState) -> Iterator[None]:
        """Serve /metrics, /healthz, /readyz while executing, when a port is set."""
        port = self.config.observability.prometheus_port
        if port is None:
            yield
            return
        try:
            server = ProbeServer(port, self._observability.registry, lambda: run.ready).start()
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on port {port} (LOOM_OBSERVABILITY__PROMETHEUS_PORT): "
                f"{exc.strerror or exc}"
            ) from None
        self.probe_port = server.port
        # loom_ready says what /readyz says, read at scrape time.
        ready = self._observability.metrics.ready.labels(self.plan.name)
        ready.set_function(lambda: float(run.ready))
        try:
            yield
        finally:
            ready.set_function(lambda: 0.0)
            server.stop()

    @property
    def run_state(self) -> RunState | None:
        """The state of the run in progress (its workers' loops), or None between runs."""
        return self._run_state

    @property
    def observability(self) -> ObservabilityRuntime:
        return self._observability

    def request_stop(self) -> None:
        """Ask a running (or starting) ``run()`` to drain and return.

        The same as SIGTERM for a service: stop reading, finish in-flight
        records within ``force_shutdown_timeout_ms``, commit, return.
        """
        self._stop.set()
        run = self._run_state
        if run is not None:
            run.stop.set()

    def shutdown(self) -> None:
        """Release adapter resources after a run or failed build."""
        prepared, self._prepared, self._run_state = self._prepared, None, None
        if prepared is not None:
            prepared.shutdown()

    # -- helpers ----------------------------------------------------------

    def _require_flow(self) -> StreamFlow[Any, Any]:
        if self._flow is None:
            raise RuntimeError("the runner has no flow; pass flow= or build it with from_context")
        return self._flow

    def _runtime(self) -> BytewaxRuntimeConfig:
        return self._runtime_override or self.config.runtime

    def _source_settings(self, runtime: BytewaxRuntimeConfig) -> SourceSettings:
        """The run's policies, decided here once: commits follow the delivery
        guarantee, at most as often as ``auto.commit.interval.ms`` says (default
        1 s); a drain waits at most the force-shutdown timeout."""
        timeout_ms = runtime.force_shutdown_timeout_ms
        kafka = self.config.kafka
        interval_ms = int(kafka.consumer.get("auto.commit.interval.ms", 1000))
        return SourceSettings(
            commits=CommitPolicy.for_delivery(kafka.delivery, interval_ms),
            drain_timeout_s=None if timeout_ms is None else timeout_ms / 1000,
            snapshot_interval_s=self.config.state.snapshot_interval_ms / 1000,
        )

    def _state_store(self, runtime: BytewaxRuntimeConfig) -> StateStore | None:
        """Where the flow's state is snapshotted, decided once per run (``state.*``).

        A flow with stateful nodes needs ``state.dir`` (a persistent volume)
        unless ``state.durability`` is ``volatile``: state in this process's
        memory, lost with it, which is logged as the weaker choice it is.
        """
        nodes = self.plan.state_nodes()
        if not nodes:
            return None
        settings = self.config.state
        names = ", ".join(repr(node.node_id) for node in nodes)
        if self.config.kafka.delivery.auto_commit:
            logger.warning(
                "state of %s with at-most-once delivery: librdkafka commits offsets whatever "
                "the snapshots hold, so a crash can lose what open windows and keys held",
                names,
            )
        if settings.dir is not None:
            directory = Path(settings.dir) / re.sub(r"[^A-Za-z0-9_.-]+", "_", self.plan.name)
            return SqliteStateStore(directory, _cluster_workers(runtime))
        if settings.durability == "volatile":
            logger.warning(
                "state of %s is volatile (state.durability=volatile): a crash loses it and "
                "the windows and keys it held; set state.dir for durable state",
                names,
            )
            if self._volatile_state is None:
                self._volatile_state = MemoryStateStore()
            return self._volatile_state
        raise ConfigPathError(
            [
                (
                    [("state", "dir")],
                    f"the flow keeps state ({names}) and needs a directory on a persistent "
                    "volume for its snapshots; or accept losing state on a crash with "
                    "state.durability=volatile",
                )
            ]
        )

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Read wall-clock milliseconds from ``clock`` (``TestRunner`` controls time)."""
        self._clock = clock

    def _kafka_transport(self) -> Transport:
        # Imported on first use: tests and tools that never touch Kafka skip it.
        from loom.transports.kafka import KafkaTransport  # noqa: PLC0415

        return KafkaTransport(self.config.kafka)
