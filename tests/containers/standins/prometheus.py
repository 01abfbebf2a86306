"""prom/prometheus stand-in: reads the scrape configuration the compose file
mounts (--config.file), scrapes its static targets every scrape_interval and
answers on 127.0.0.1:9090 (or --web.listen-address):

  GET /-/ready, /-/healthy
  GET /api/v1/targets          activeTargets with health "up"/"down" and lastError
  GET /api/v1/query?query=M    per target: the sum of metric M's samples (a
                               plain metric name only, no PromQL)

Standard library only, so the YAML is read line by line: `scrape_interval`,
`job_name`, `metrics_path` and flow-style `targets: ["host:port", ...]`.
"""

from __future__ import annotations

import json
import re
import signal
import sys
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TARGETS: list[dict] = []  # type: ignore[type-arg]
LOCK = threading.Lock()
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def seconds(text: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)", text.strip()).groups()  # type: ignore[union-attr]
    return int(number) * {"ms": 0.001, "s": 1, "m": 60}[unit]


def load(path: str) -> float:
    interval, job, metrics_path = 60.0, "", "/metrics"
    with open(path, encoding="utf-8") as config:
        lines = config.read().splitlines()
    for line in lines:
        key, _, value = line.split("#")[0].strip().lstrip("- ").partition(":")
        value = value.strip()
        if key == "scrape_interval" and not job:
            interval = seconds(value)
        elif key == "job_name":
            job, metrics_path = value, "/metrics"
        elif key == "metrics_path":
            metrics_path = value
        elif key == "targets":
            for target in json.loads(value):
                TARGETS.append(
                    {
                        "labels": {"job": job, "instance": target},
                        "scrapePool": job,
                        "scrapeUrl": f"http://{target}{metrics_path}",
                        "health": "unknown",
                        "lastError": "",
                        "samples": {},
                    }
                )
    return interval


def scrape(interval: float) -> None:
    while True:
        for target in TARGETS:
            try:
                with urllib.request.urlopen(target["scrapeUrl"], timeout=min(interval, 5)) as r:
                    text = r.read().decode()
                samples: dict[str, float] = {}
                for line in text.splitlines():
                    match = SAMPLE.match(line)
                    if match:
                        samples[match[1]] = samples.get(match[1], 0.0) + float(match[3])
                update = {"health": "up", "lastError": "", "samples": samples}
            except Exception as error:
                update = {"health": "down", "lastError": str(error)}
            with LOCK:
                target.update(update, lastScrape=time.time())
        time.sleep(interval)


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def reply(self, body: object, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        with LOCK:
            targets = [dict(t) for t in TARGETS]
        if url.path in ("/-/ready", "/-/healthy"):
            self.reply("ok")
        elif url.path == "/api/v1/targets":
            active = [{k: v for k, v in t.items() if k != "samples"} for t in targets]
            self.reply({"status": "success", "data": {"activeTargets": active}})
        elif url.path == "/api/v1/query":
            name = urllib.parse.parse_qs(url.query).get("query", [""])[0]
            result = [
                {
                    "metric": {"__name__": name, **t["labels"]},
                    "value": [t["lastScrape"], repr(t["samples"][name])],
                }
                for t in targets
                if name in t.get("samples", {})
            ]
            self.reply({"status": "success", "data": {"resultType": "vector", "result": result}})
        else:
            self.reply({"status": "error"}, 404)


def main() -> None:
    options = dict(arg.lstrip("-").partition("=")[::2] for arg in sys.argv[1:])
    interval = load(options.get("config.file", "/etc/prometheus/prometheus.yml"))
    host, _, port = options.get("web.listen-address", "127.0.0.1:9090").rpartition(":")
    server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=scrape, args=(interval,), daemon=True).start()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = [target["scrapeUrl"] for target in TARGETS]
    print(f"stand-in: scraping {urls} every {interval:g} s", flush=True)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    sys.exit(0)


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
