"""Declarative stream processing: describe a flow, compile it, run it on Bytewax."""

from loom.streaming import nodetypes  # noqa: F401 - registers the built-in node types
from loom.streaming.compiler import compile_flow
from loom.streaming.errors import BusinessError, ErrorEnvelope, ErrorKind, FlowValidationError
from loom.streaming.message import Message, MessageMeta
from loom.streaming.nodes import (
    BatchStep,
    CollectBatch,
    Drain,
    ExpandStep,
    FromTopic,
    IntoSink,
    IntoTopic,
    Process,
    RecordStep,
    Retry,
    Route,
    Router,
    StreamFlow,
    WithAsync,
)

__all__ = [
    "BatchStep",
    "BusinessError",
    "CollectBatch",
    "Drain",
    "ErrorEnvelope",
    "ErrorKind",
    "ExpandStep",
    "FlowValidationError",
    "FromTopic",
    "IntoSink",
    "IntoTopic",
    "Message",
    "MessageMeta",
    "Process",
    "RecordStep",
    "Retry",
    "Route",
    "Router",
    "StreamFlow",
    "WithAsync",
    "compile_flow",
]
