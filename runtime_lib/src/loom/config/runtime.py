"""Settings for executing a dataflow on the Bytewax runtime.

These are re-exported by :mod:`loom.streaming.bytewax.runner`, whose API
documents them; they live here so the config layer can build them without
importing the runner.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from loom.structs import LoomFrozenStruct

AsyncBackend = Literal["asyncio", "trio"]
ASYNC_BACKENDS: tuple[AsyncBackend, ...] = ("asyncio", "trio")


class BytewaxRecoverySettings(LoomFrozenStruct, frozen=True):
    """Recovery settings for the Bytewax runtime.

    :param db_dir: Local recovery directory shared by this execution.
    :param backup_interval_ms: Optional snapshot backup interval in milliseconds.
    """

    db_dir: str
    backup_interval_ms: int | None = None

    def __post_init__(self) -> None:
        if not self.db_dir:
            raise ValueError("db_dir must name a directory")
        if self.backup_interval_ms is not None and self.backup_interval_ms < 0:
            raise ValueError(f"backup_interval_ms must be >= 0, got {self.backup_interval_ms}")


class BytewaxRuntimeConfig(LoomFrozenStruct, frozen=True):
    """Runtime settings for executing a Bytewax dataflow.

    Delivery guarantee: By default Kafka offsets are committed by the
    consumer's auto-commit policy and are not tied to downstream success.
    When ``enable.auto.commit`` is disabled in the consumer settings, Loom
    tracks item completion through the adapter and commits offsets only after
    the downstream branch finishes successfully.

    :param workers_per_process: Number of worker threads in this process.
    :param process_id: Optional cluster process id.
    :param addresses: Optional cluster address list, including this process.
    :param epoch_interval_ms: Optional epoch duration in milliseconds.
    :param recovery: Optional recovery settings.
    :param async_backend: Anyio backend used for AsyncBridge when the flow
        contains WithAsync nodes: ``"asyncio"`` (default) or ``"trio"``.
    :param use_uvloop: Replace the asyncio event loop with uvloop. Only
        effective when ``async_backend`` is ``"asyncio"`` and the platform is
        not Windows.
    :param force_shutdown_timeout_ms: Maximum milliseconds to wait for
        in-flight async tasks during shutdown. When exceeded, the portal thread
        is abandoned and a warning is logged. ``None`` waits indefinitely.
    """

    workers_per_process: int = 1
    process_id: int | None = None
    addresses: tuple[str, ...] | None = None
    epoch_interval_ms: int | None = None
    recovery: BytewaxRecoverySettings | None = None
    async_backend: AsyncBackend = "asyncio"
    use_uvloop: bool = False
    force_shutdown_timeout_ms: int | None = None

    def __post_init__(self) -> None:
        if self.addresses is not None:
            # Keep the struct hashable when built with a list.
            msgspec.structs.force_setattr(self, "addresses", tuple(self.addresses))
        problems = self._problems()
        if problems:
            raise ValueError("\n".join(problems))

    def _problems(self) -> list[str]:
        """Every invalid setting, each line starting with the field's name."""
        problems = []
        if self.workers_per_process < 1:
            problems.append(f"workers_per_process must be >= 1, got {self.workers_per_process}")
        for name in ("epoch_interval_ms", "force_shutdown_timeout_ms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                problems.append(f"{name} must be a positive number of milliseconds, got {value}")
        if self.async_backend not in ASYNC_BACKENDS:
            problems.append(
                f"async_backend must be one of {', '.join(ASYNC_BACKENDS)}, "
                f"got {self.async_backend!r}"
            )
        if self.addresses is not None:
            if self.process_id is None:
                problems.append("process_id is required when addresses is set")
            elif not 0 <= self.process_id < len(self.addresses):
                problems.append(
                    f"process_id {self.process_id} is not an index into the "
                    f"{len(self.addresses)} addresses"
                )
        elif self.process_id not in (None, 0):
            problems.append("process_id needs addresses (every process of the cluster)")
        return problems
