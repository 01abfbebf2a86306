"""Sinks resolved by name from the config: ``IntoSink("audit")``.

A team registers a sink *type* with ``StreamingRunner.register_sink``; the
config says which type backs each name and with what options::

    streaming:
      sinks:
        audit: {type: AuditLogSink, options: {path: /var/log/audit.jsonl}}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from bytewax.outputs import DynamicSink


@runtime_checkable
class RegisteredSink(Protocol):
    """A sink class buildable from config options.

    ``from_config`` returns a Bytewax ``DynamicSink`` whose partitions receive
    :class:`loom.streaming.Message` items (or ``ErrorEnvelope`` items when the
    sink is an error route). The registry name is the class attribute
    ``sink_type`` if present, else the class name.
    """

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> DynamicSink[Any]: ...


class SinkRegistry:
    """Sink types by name."""

    def __init__(self) -> None:
        self._types: dict[str, Any] = {}

    @staticmethod
    def type_name(sink_class: type) -> str:
        name = getattr(sink_class, "sink_type", None)
        return name if isinstance(name, str) else sink_class.__name__

    def register(self, sink_class: type) -> None:
        """Add ``sink_class``; a class that is not a :class:`RegisteredSink` is a TypeError."""
        if not isinstance(sink_class, type) or not isinstance(sink_class, RegisteredSink):
            raise TypeError(
                f"{sink_class!r} does not implement RegisteredSink: it must be a class with a "
                "from_config(options) classmethod returning a bytewax DynamicSink"
            )
        self._types[self.type_name(sink_class)] = sink_class

    def build(self, type_name: str, options: Mapping[str, Any]) -> DynamicSink[Any]:
        sink_class = self._types.get(type_name)
        if sink_class is None:
            known = ", ".join(sorted(self._types)) or "none"
            raise LookupError(
                f"sink type {type_name!r} is not registered (registered: {known}); "
                "call StreamingRunner.register_sink first"
            )
        built: DynamicSink[Any] = sink_class.from_config(options)
        return built

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._types
