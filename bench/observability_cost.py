"""What observability costs: the same Loom flow with it on and off, side by side.

``on``: OpenTelemetry SDK spans (run spans, 1% of polls as batch spans, a span
per record that carries ``traceparent`` — here none do) exported through a
batch processor, and every Prometheus metric updated and served on a port.
``off``: only the two run spans, no metrics inside the dataflow.
Runs alternate on the same broker, records and partitions; medians of
``--runs``. Target (docs/benchmarks.md, Targets): on >= 0.95 x off.

    .venv/bin/python bench/observability_cost.py --records 500000 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Cluster, PeerSpec, measure

from loom.devtools.broker import DevBroker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=3)
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as logs, DevBroker() as broker:
        cluster = Cluster(broker.bootstrap_servers, broker.pid)
        for run in range(args.runs):
            for mode in ("off", "on"):
                spec = PeerSpec("loom", f"Loom observability {mode}", extra={"observability": mode})
                result = measure(cluster, spec, args.records, args.partitions, Path(logs))
                if not result.ok:
                    print(f"run {run + 1} {mode}: FAILED {result.error}", file=sys.stderr)
                    return 1
                rates[mode].append(result.rate)
                print(f"run {run + 1} observability {mode:>3}: {result.rate:,.0f} records/s")
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    ratio = on / off
    verdict = "PASS" if ratio >= 0.95 else "MISS"
    print(f"\nmedian records/s  off {off:,.0f}  on {on:,.0f}  on/off {ratio:.3f}x  {verdict}")
    print("target: enabling OTel + Prometheus costs at most 5% (on/off >= 0.95)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
