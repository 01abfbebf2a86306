"""Configuration: one validated ``ConfigContext`` from YAML, a dict or the environment."""

from loom.config.context import (
    ConfigContext,
    KafkaSettings,
    ObservabilitySettings,
    SinkSettings,
    StreamingSettings,
)

__all__ = [
    "ConfigContext",
    "KafkaSettings",
    "ObservabilitySettings",
    "SinkSettings",
    "StreamingSettings",
]
