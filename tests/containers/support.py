"""Helpers of the container tests: polling, HTTP, Kafka reads and offsets."""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, TopicPartition

from tests.template.support import REPO


def template_base_image(python_version: str = "3.11") -> str:
    """The pinned base image copier.yml gives the generated Dockerfile (as the script reads it)."""
    config = yaml.safe_load((REPO / "copier.yml").read_text(encoding="utf-8"))
    found = re.search(rf"'{re.escape(python_version)}': '([^']+)'", config["base_image"]["default"])
    assert found, f"no base image for Python {python_version} in copier.yml"
    return found.group(1)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll until ``predicate()`` is truthy and return it; fail naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)
    return result


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""
    except OSError:
        return 0, ""


def http_json(url: str) -> Any:
    status, body = http_get(url)
    return json.loads(body) if status == 200 else None


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` (with these labels) in a /metrics page."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{key}="{wanted}"' in head for key, wanted in labels.items()):
            total += float(value)
    return total


def read_all(
    bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float = 60
) -> list[Message]:
    """Read ``topic`` from the start until ``expected`` records arrived (or the deadline)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "loom-containers-reader",
            "enable.auto.commit": False,
        }
    )
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    records: list[Message] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < expected and time.monotonic() < deadline:
            records += [m for m in consumer.consume(1000, timeout=0.2) if m.error() is None]
    finally:
        consumer.close()
    return records


def committed(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        found = consumer.committed(
            [TopicPartition(topic, p) for p in range(partitions)], timeout=10
        )
    finally:
        consumer.close()
    return {tp.partition: tp.offset for tp in found}
