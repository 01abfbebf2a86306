"""A service like a generated one, run as a subprocess by the process-level tests.

``python -m tests.kafka.service_app`` reads only ``LOOM_*``/``OTEL_*``
variables. ``SERVICE_APP_SLOW_US`` makes each record take that long (to have
work in flight when a test kills or stops the process).
"""

from __future__ import annotations

import os
import time

from loom.service import serve
from loom.streaming import FromTopic, IntoTopic, Process, RecordStep, StreamFlow
from tests.runtime.payloads import Enriched, Order, enrich

SLOW_S = int(os.environ.get("SERVICE_APP_SLOW_US", "0")) / 1_000_000


def process(order: Order) -> Enriched:
    if SLOW_S:
        time.sleep(SLOW_S)  # simulated work per record, not a test wait
    return enrich(order)


flow = StreamFlow(
    "service-app",
    source=FromTopic("input", payload=Order),
    process=Process(RecordStep(process)),
    output=IntoTopic("output", payload=Enriched),
    errors=IntoTopic("dlq"),
)

if __name__ == "__main__":
    serve(flow)
