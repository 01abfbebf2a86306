"""jaegertracing/all-in-one stand-in: receives OTLP/HTTP spans (protobuf) on
127.0.0.1:4318 and answers the two Jaeger query API calls the tests use on
127.0.0.1:16686:

  GET /api/services                       {"data": [service names]}
  GET /api/services/<service>/operations  {"data": [span names]}

Standard library only: the OTLP protobuf is walked by field numbers.
"""

from __future__ import annotations

import gzip
import json
import signal
import sys
import threading
import urllib.parse
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SPANS: dict[str, set[str]] = defaultdict(set)
LOCK = threading.Lock()


def varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def fields(buf: bytes) -> Iterator[tuple[int, bytes | int]]:
    """(field number, value) of a protobuf message; length-delimited values as bytes."""
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
            yield number, value
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = varint(buf, i)
            yield number, buf[i : i + size]
            i += size
        else:
            raise ValueError(f"wire type {wire}")


def sub(buf: bytes, number: int) -> Iterator[bytes]:
    for n, value in fields(buf):
        if n == number and isinstance(value, bytes):
            yield value


def record(request: bytes) -> int:
    """ExportTraceServiceRequest -> SPANS[service.name] += span names."""
    count = 0
    for resource_spans in sub(request, 1):
        service = "unknown"
        for resource in sub(resource_spans, 1):
            for attribute in sub(resource, 1):
                key = next(sub(attribute, 1), b"").decode()
                if key == "service.name":
                    value = next(sub(attribute, 2), b"")
                    service = next(sub(value, 1), b"").decode()
        for scope_spans in sub(resource_spans, 2):
            for span in sub(scope_spans, 2):
                with LOCK:
                    SPANS[service].add(next(sub(span, 5), b"").decode())
                count += 1
    return count


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces":
            self.reply(404, b"", "text/plain")
            return
        count = record(body)
        print(f"stand-in: received {count} spans", flush=True)
        self.reply(200, b"", "application/x-protobuf")

    def do_GET(self) -> None:
        parts = [urllib.parse.unquote(p) for p in self.path.split("?")[0].split("/") if p]
        with LOCK:
            if parts == ["api", "services"]:
                data = sorted(SPANS)
            elif len(parts) == 4 and parts[:2] == ["api", "services"] and parts[3] == "operations":
                data = sorted(SPANS.get(parts[2], ()))
            elif parts == []:
                data = []
            else:
                self.reply(404, b"", "text/plain")
                return
        self.reply(200, json.dumps({"data": data, "total": len(data)}).encode(), "application/json")


def main() -> None:
    servers = [ThreadingHTTPServer(("127.0.0.1", port), Handler) for port in (4318, 16686)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    print("stand-in: OTLP/HTTP on 127.0.0.1:4318, query API on 127.0.0.1:16686", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    sys.exit(0)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
