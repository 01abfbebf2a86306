"""Loom side by side with its peers, on one broker, in one command.

    .venv/bin/python bench/run.py [--records N] [--runs 3] [--partitions 3]

Starts one Tansu broker (``loom.devtools.broker.DevBroker``) and, for each run,
produces ``--records`` fresh ~100-byte JSON records into a new topic; then
runs each peer in its own subprocess until every record is in its output
topic and (for peers that commit) every input offset is committed:

- ``loom``: a StreamFlow (RecordStep, IntoTopic output, IntoTopic errors),
  manual at-least-once commits, on StreamingRunner;
- ``bytewax``: a hand-written ``KafkaSource -> map -> KafkaSink`` dataflow;
- ``quix``: a Quix Streams application, at-least-once;
- ``plain``: a confluent-kafka consume/produce loop (the practical limit).

Runs are interleaved (run 1 of every peer, then run 2, ...) and the median
is reported with the ratios Loom/peer against the targets. Then: Loom's
scaling over workers and processes, and its end-to-end latency at about 50%
of its measured throughput. See bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import confluent_kafka

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    PEER_LABELS,
    Cluster,
    LatencyResult,
    PeerSpec,
    RunResult,
    log_directory,
    measure,
    measure_latency,
    wait_for_quiet,
)

from loom.devtools.broker import DevBroker

TARGETS = {"plain": 0.8, "bytewax": 1.5, "quix": 2.5}
"""Loom / peer throughput ratios to reach (docs/benchmarks.md, Targets)."""
DEFAULT_SCALING = "1x1,1x2,1x4,2x1,2x2"


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("loom-runtime", "bytewax", "confluent-kafka", "quixstreams", "msgspec"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = "not installed"
    found["librdkafka"] = confluent_kafka.libversion()[0]
    return found


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, Any]:
    return {
        "load_average_at_start": os.getloadavg(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": _versions(),
    }


def _parse_scaling(text: str) -> list[tuple[int, int]]:
    configs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        processes, _, workers = item.partition("x")
        configs.append((int(processes), int(workers or 1)))
    return configs


def _fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def _median(results: list[RunResult]) -> float | None:
    rates = [r.rate for r in results if r.ok]
    return statistics.median(rates) if rates else None


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quiet(args: argparse.Namespace) -> None:
    if args.quiet_wait <= 0:
        return
    busy = wait_for_quiet(args.quiet_wait)
    if busy > 0.25:
        _log(f"    (the machine is busy with other work: {busy:.2f} cores; measuring anyway)")


def run_peers(
    cluster: Cluster, args: argparse.Namespace, log_dir: Path
) -> dict[str, list[RunResult]]:
    results: dict[str, list[RunResult]] = {peer: [] for peer in args.peers}
    for index in range(args.runs):
        for peer in args.peers:
            spec = PeerSpec(peer, PEER_LABELS[peer])
            _quiet(args)
            _log(f"[run {index + 1}/{args.runs}] {spec.label} ...")
            result = measure(cluster, spec, args.records, args.partitions, log_dir)
            if result.ok:
                _log(f"    {_fmt_rate(result.rate)} records/s (start-up {result.startup_s:.1f} s)")
            else:
                _log(f"    FAILED: {result.error}")
            results[peer].append(result)
    return results


def run_scaling(cluster: Cluster, args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for processes, workers in args.scaling:
        label = f"{processes} process{'es' if processes > 1 else ''} x {workers} worker" + (
            "s" if workers > 1 else ""
        )
        spec = PeerSpec("loom", f"Loom {label}", workers=workers, processes=processes)
        runs = []
        for index in range(args.scaling_runs):
            _quiet(args)
            _log(f"[scaling {index + 1}/{args.scaling_runs}] {spec.label} ...")
            result = measure(cluster, spec, args.scaling_records, args.scaling_partitions, log_dir)
            _log(
                f"    {_fmt_rate(result.rate)} records/s"
                if result.ok
                else f"    FAILED: {result.error}"
            )
            runs.append(result)
        rows.append(
            {
                "label": label,
                "processes": processes,
                "workers_per_process": workers,
                "workers": processes * workers,
                "median": _median(runs),
                "runs": [asdict(r) for r in runs],
            }
        )
    return rows


def print_report(
    args: argparse.Namespace,
    info: dict[str, Any],
    results: dict[str, list[RunResult]],
    scaling: list[dict[str, Any]],
    latencies: list[LatencyResult],
) -> None:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    print()
    print(
        f"Loom benchmark: {args.records:,} records (~100-byte JSON) per run, "
        f"{args.partitions} partitions, median of {args.runs} runs, one Tansu broker on loopback"
    )
    print(f"machine: {info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']}")
    load = ", ".join(f"{value:.2f}" for value in info["load_average_at_start"])
    print(f"load average before the benchmark: {load} (anything else running skews the numbers)")
    print(f"versions: {versions}")
    print()
    print("throughput, records/s: from the first output record until every record is out and")
    print("(Loom, Quix, plain loop: the peers that commit) every input offset is committed;")
    print("'all out' stops the clock at the last output record instead (no commit wait)")
    header = (
        f"{'peer':<38} {'median':>9}  {'runs':<26} {'all out':>9} {'start-up':>8}  {'Loom/peer':>9}"
    )
    print(header)
    print("-" * len(header))
    loom = _median(results.get("loom", []))
    for peer, runs in results.items():
        median = _median(runs)
        rates = " ".join(_fmt_rate(r.rate) if r.ok else "FAILED" for r in runs)
        outs = [r.out_rate for r in runs if r.ok]
        out = _fmt_rate(statistics.median(outs)) if outs else "-"
        startups = [r.startup_s for r in runs if r.ok]
        startup = f"{statistics.median(startups):.1f} s" if startups else "-"
        ratio = f"{loom / median:.2f}x" if loom and median else "-"
        shown = _fmt_rate(median) if median else "FAILED"
        print(f"{PEER_LABELS[peer]:<38} {shown:>9}  {rates:<26} {out:>9} {startup:>8}  {ratio:>9}")
    _print_cpu(results)
    if loom:
        print()
        print("targets (docs/benchmarks.md, Targets), on the records/s medians above")
        for peer, target in TARGETS.items():
            median = _median(results.get(peer, []))
            if median is None:
                continue
            achieved = loom / median
            verdict = "PASS" if achieved >= target else "MISS"
            print(f"  Loom >= {target:g}x {PEER_LABELS[peer]:<38} {achieved:5.2f}x  {verdict}")
    if scaling:
        _print_scaling(args, scaling)
    if latencies:
        _print_latency(latencies)


def _median_of(runs: list[RunResult], attribute: str) -> float | None:
    values = [getattr(r, attribute) for r in runs if r.ok]
    return statistics.median(values) if values else None


def _print_cpu(results: dict[str, list[RunResult]]) -> None:
    print()
    print("CPU during the timed part (medians): the peer's CPU per record, and cores busy")
    print("(1.00 = one core) in the peer, the broker, and anything else on the machine")
    header = (
        f"{'peer':<38} {'us CPU/rec':>10} {'peer':>6} {'broker':>7} {'others':>7}"
        f"  {'Loom/peer by CPU':>16}"
    )
    print(header)
    print("-" * len(header))
    loom = _median_of(results.get("loom", []), "cpu_us_per_record")
    for peer, runs in results.items():
        ok = [r for r in runs if r.ok and r.seconds > 0]
        if not ok:
            print(f"{PEER_LABELS[peer]:<38} {'-':>10}")
            continue
        per_record = statistics.median(r.cpu_us_per_record for r in ok)
        cores = statistics.median(r.peer_cpu_s / r.seconds for r in ok)
        broker = statistics.median(r.broker_cpu_s / r.seconds for r in ok)
        others = statistics.median(r.other_cpu_s / r.seconds for r in ok)
        ratio = f"{per_record / loom:.2f}x" if loom and per_record else "-"
        print(
            f"{PEER_LABELS[peer]:<38} {per_record:>10.1f} {cores:>6.2f} {broker:>7.2f}"
            f" {others:>7.2f}  {ratio:>16}"
        )


def _print_scaling(args: argparse.Namespace, scaling: list[dict[str, Any]]) -> None:
    print()
    print(
        f"scaling: Loom records/s by workers ({args.scaling_records:,} records, "
        f"{args.scaling_partitions} partitions, median of {args.scaling_runs})"
    )
    base = scaling[0]["median"]
    header = (
        f"{'configuration':<28} {'workers':>7} {'records/s':>10} {'vs first':>9}"
        f" {'peer cores':>10} {'us CPU/rec':>10}"
    )
    print(header)
    print("-" * len(header))
    for row in scaling:
        median = row["median"]
        ratio = f"{median / base:.2f}x" if median and base else "-"
        shown = _fmt_rate(median) if median else "FAILED"
        ok = [r for r in row["runs"] if r["error"] is None and r["seconds"] > 0]
        cores = statistics.median(r["peer_cpu_s"] / r["seconds"] for r in ok) if ok else 0.0
        per_record = (
            statistics.median(1e6 * r["peer_cpu_s"] / r["records"] for r in ok) if ok else 0.0
        )
        print(
            f"{row['label']:<28} {row['workers']:>7} {shown:>10} {ratio:>9}"
            f" {cores:>10.2f} {per_record:>10.1f}"
        )


def _print_latency(latencies: list[LatencyResult]) -> None:
    first = latencies[0]
    print()
    print(
        f"latency: Loom, 1 worker, input paced at {_fmt_rate(first.rate)} records/s, "
        f"{first.records:,} records; in ms, from the input record's produce time to the "
        "output record's timestamp (and to a consumer reading it)"
    )
    header = (
        f"{'configuration':<40} {'achieved/s':>10} {'p50':>6} {'p99':>6} {'max':>6}"
        f"  {'read p50':>8} {'read p99':>8}"
    )
    print(header)
    print("-" * len(header))
    for latency in latencies:
        if latency.error:
            print(f"{latency.label:<40} FAILED: {latency.error}")
            continue
        print(
            f"{latency.label:<40} {_fmt_rate(latency.achieved_rate):>10} "
            f"{latency.p50_ms:>6.0f} {latency.p99_ms:>6.0f} {latency.max_ms:>6.0f}"
            f"  {latency.received_p50_ms:>8.0f} {latency.received_p99_ms:>8.0f}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Loom vs Bytewax vs Quix Streams vs a plain confluent-kafka loop."
    )
    parser.add_argument("--records", type=int, default=1_000_000, help="records per run")
    parser.add_argument("--runs", type=int, default=3, help="runs per peer (median reported)")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument(
        "--peers",
        default="loom,bytewax,quix,plain",
        help="comma-separated subset of loom,bytewax,quix,plain",
    )
    parser.add_argument(
        "--scaling",
        default=DEFAULT_SCALING,
        help="Loom configurations PROCESSESxWORKERS, comma separated ('' to skip)",
    )
    parser.add_argument("--scaling-records", type=int, help="records per scaling run")
    parser.add_argument("--scaling-runs", type=int, help="runs per scaling configuration")
    parser.add_argument(
        "--scaling-partitions", type=int, help="partitions for scaling (default max(4, P))"
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=10.0, help="paced latency run (0 to skip)"
    )
    parser.add_argument(
        "--latency-rate",
        type=float,
        help="input records/s for the latency run (default: 50%% of Loom's median)",
    )
    parser.add_argument(
        "--latency-fetch-waits",
        default="default,10",
        help="latency runs: Loom's consumer fetch.wait.max.ms per run ('default' = Loom's)",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each run, wait up to this many seconds for the machine to be idle",
    )
    parser.add_argument("--json", type=Path, help="write every measurement here as JSON")
    parser.add_argument("--keep-logs", type=Path, help="keep the peers' logs in this directory")
    args = parser.parse_args(argv)
    args.peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(args.peers) - set(PEER_LABELS))
    if unknown:
        parser.error(f"unknown peers: {', '.join(unknown)}")
    args.scaling = _parse_scaling(args.scaling)
    args.latency_fetch_waits = [
        None if item.strip() == "default" else int(item)
        for item in args.latency_fetch_waits.split(",")
        if item.strip()
    ]
    args.scaling_records = args.scaling_records or args.records
    args.scaling_runs = args.scaling_runs or args.runs
    args.scaling_partitions = args.scaling_partitions or max(4, args.partitions)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "quix" in args.peers and importlib.util.find_spec("quixstreams") is None:
        print(
            "quixstreams is not installed: "
            ".venv/bin/pip install --no-deps -r bench/requirements.txt "
            "(or leave it out with --peers loom,bytewax,plain)",
            file=sys.stderr,
        )
        return 2
    info = machine()
    began = time.monotonic()
    latencies: list[LatencyResult] = []
    with log_directory(args.keep_logs) as log_dir, DevBroker() as broker:
        cluster = Cluster(broker.bootstrap_servers, broker.pid)
        results = run_peers(cluster, args, log_dir)
        scaling = run_scaling(cluster, args, log_dir)
        if args.latency_seconds > 0:
            rate = args.latency_rate
            if rate is None:
                base = _median(results.get("loom", [])) or (
                    scaling[0]["median"] if scaling else None
                )
                rate = 0.5 * base if base else None
            if rate is None:
                _log("latency skipped: no Loom throughput to take 50% of (use --latency-rate)")
            else:
                for wait in args.latency_fetch_waits:
                    consumer = {} if wait is None else {"fetch.wait.max.ms": wait}
                    label = (
                        "Loom defaults (fetch.wait.max.ms=100)"
                        if wait is None
                        else f"consumer fetch.wait.max.ms={wait}"
                    )
                    _log(f"[latency] Loom at {_fmt_rate(rate)} records/s, {label} ...")
                    latencies.append(
                        measure_latency(
                            cluster,
                            PeerSpec("loom", label, extra={"consumer": consumer}),
                            rate=rate,
                            duration_s=args.latency_seconds,
                            partitions=args.partitions,
                            log_dir=log_dir,
                        )
                    )
    print_report(args, info, results, scaling, latencies)
    print(f"\n(total {time.monotonic() - began:.0f} s)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {
            "command": " ".join(sys.argv),
            "records": args.records,
            "runs": args.runs,
            "partitions": args.partitions,
            "machine": info,
            "throughput": {
                peer: {"median": _median(runs), "runs": [asdict(r) for r in runs]}
                for peer, runs in results.items()
            },
            "targets": {
                peer: {
                    "target": target,
                    "ratio": (
                        _median(results["loom"]) / _median(results[peer])  # type: ignore[operator]
                        if _median(results.get("loom", [])) and _median(results.get(peer, []))
                        else None
                    ),
                }
                for peer, target in TARGETS.items()
                if peer in results
            },
            "scaling": scaling,
            "latency": [asdict(latency) for latency in latencies],
        }
        args.json.write_text(json.dumps(document, indent=2))
    failed = [r for runs in results.values() for r in runs if not r.ok]
    failed += [r for row in scaling for r in row["runs"] if r["error"]]
    return 1 if failed or any(latency.error for latency in latencies) else 0


if __name__ == "__main__":
    sys.exit(main())
