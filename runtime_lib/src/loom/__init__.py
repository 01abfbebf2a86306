"""Loom: declarative Kafka stream processing on Bytewax."""

__version__ = "0.1.0"
