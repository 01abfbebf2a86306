"""Tracing, metrics and logs of a running flow."""

from loom.observability.runtime import ObservabilityRuntime, Scope

__all__ = ["ObservabilityRuntime", "Scope"]
