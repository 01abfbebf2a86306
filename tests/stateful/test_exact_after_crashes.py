"""Window results are exact after SIGKILLs: every record counted once, no window lost.

A windowed service (``tests.stateful.window_app``: count and id sum per key
and 1-second window) runs against paced real-time input while it is killed
with SIGKILL several times and restarted on the same state directory. Every
result it emitted is compared with an independent computation from the
input: a result may be emitted again (whole), but never with a wrong value,
and every (key, window) that received records has its result.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from pathlib import Path

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kafka.process import ServiceProcess, free_port, http_get, service_env
from tests.kafka.support import Cluster, TopicTail, wait_until
from tests.stateful.support import PacedInput, emitted, expected_windows, settle
from tests.stateful.window_app import GRACE_MS, WINDOW_MS, Reading

APP = "tests.stateful.window_app"


def fresh_topics(cluster: Cluster, partitions: int) -> dict[str, str]:
    return {
        "input": cluster.topic(partitions, "win-in"),
        "output": cluster.topic(partitions, "win-out"),
        "dlq": cluster.topic(1, "win-dlq"),
    }


@pytest.mark.slow
def test_every_window_result_counts_each_record_once_after_several_sigkills(
    cluster: Cluster, tmp_path: Path
) -> None:
    topics = fresh_topics(cluster, 4)
    group = f"win-{uuid.uuid4().hex[:6]}"
    env = service_env(
        cluster,
        topics,
        group,
        LOOM_STATE__DIR=tmp_path / "state",
        LOOM_STATE__SNAPSHOT_INTERVAL_MS=200,
    )
    source = PacedInput(cluster.bootstrap, topics["input"], keys=300, rate=1500, seconds=12)
    output, dead_letters = TopicTail(cluster, topics["output"]), TopicTail(cluster, topics["dlq"])
    kills = 0
    source.start()
    while source.is_alive() and kills < 3:
        with ServiceProcess(env, APP) as service:
            service.wait_ready()
            before = sum(cluster.committed(group, topics["input"]).values())
            wait_until(
                lambda: sum(cluster.committed(group, topics["input"]).values()) > before + 500,
                60,
                "the service to commit more input",
            )
            service.kill()  # mid-stream: no drain, no final snapshot, no final commit
            kills += 1
    source.join()
    expected = expected_windows(source.sent)
    with ServiceProcess(env, APP) as service:
        service.wait_ready()
        wait_until(
            lambda: {(t.key, t.start_ms) for t in emitted(output)} >= set(expected),
            90,
            "a result for every window that received records",
        )
        assert service.terminate() == 0
    settle(output)
    settle(dead_letters)
    results = emitted(output)
    wrong = [t for t in results if expected.get((t.key, t.start_ms)) != (t.count, t.id_sum)]
    assert not wrong, f"{len(wrong)} results differ from the input, e.g. {wrong[:3]}"
    seen = Counter((t.key, t.start_ms) for t in results)
    assert set(seen) == set(expected)
    assert dead_letters.records == []  # nothing was late
    output.close()
    dead_letters.close()
    print(
        f"\nstateful crash test: {len(source.sent)} records, {len(expected)} (key, window) "
        f"pairs, {kills} SIGKILLs; {sum(seen.values()) - len(seen)} whole results emitted again"
    )


def consumed(service: ServiceProcess) -> float:
    """``loom_records_consumed_total`` of a running service (0 before its first scrape)."""
    status, text = http_get(f"{service.probe_url}/metrics")
    if status != 200:
        return 0.0
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "loom_records_consumed_total"
    )


def readings(start: int, count: int) -> list[bytes]:
    return [msgspec.json.encode(Reading(i)) for i in range(start, start + count)]


def test_sigterm_snapshots_commits_and_exits_zero_and_open_windows_continue(
    cluster: Cluster, tmp_path: Path
) -> None:
    topics = fresh_topics(cluster, 2)
    group = f"win-{uuid.uuid4().hex[:6]}"
    # No snapshot but the one the drain takes; windows an hour ahead stay open.
    env = service_env(
        cluster, topics, group, LOOM_STATE__DIR=tmp_path, LOOM_STATE__SNAPSHOT_INTERVAL_MS=3_600_000
    )
    window = (int(time.time() * 1000) // WINDOW_MS + 3600) * WINDOW_MS
    keys = [b"k%d" % (i % 10) for i in range(200)]
    cluster.produce(topics["input"], readings(0, 200), keys=keys, timestamp_ms=window + 10)
    output = TopicTail(cluster, topics["output"])
    with ServiceProcess(env, APP) as service:
        service.wait_ready()
        wait_until(lambda: consumed(service) >= 200, 30, "the service to read the input")
        assert cluster.committed(group, topics["input"]) == {}  # held: not in a snapshot yet
        assert service.terminate() == 0
    assert sum(cluster.committed(group, topics["input"]).values()) == 200
    assert emitted(output) == []  # the windows are open, in the snapshot
    # More records for the same windows, then one far later per partition closes them.
    cluster.produce(topics["input"], readings(200, 100), keys=keys[:100], timestamp_ms=window + 20)
    for partition in (0, 1):
        cluster.produce(
            topics["input"],
            readings(1000 + partition, 1),
            keys=[b"late-closer"],
            timestamp_ms=window + 10 * WINDOW_MS + GRACE_MS,
            partition=partition,
        )
    with ServiceProcess(env, APP) as service:
        service.wait_ready()
        wait_until(lambda: len(emitted(output)) >= 10, 30, "the ten windows to close")
        assert service.terminate() == 0
    counts = {t.key: (t.count, t.id_sum) for t in emitted(output) if t.start_ms == window}
    expected = expected_windows(
        [(key.decode(), i, window) for i, key in enumerate(keys)]
        + [(key.decode(), 200 + i, window) for i, key in enumerate(keys[:100])]
    )
    assert counts == {key: value for (key, _), value in expected.items()}


@pytest.mark.slow
def test_two_processes_of_two_workers_keep_windows_exact_across_a_crash(
    cluster: Cluster, tmp_path: Path
) -> None:
    topics = fresh_topics(cluster, 8)
    group = f"win-{uuid.uuid4().hex[:6]}"
    addresses = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    envs = [
        service_env(
            cluster,
            topics,
            group,
            LOOM_RUNTIME__WORKERS_PER_PROCESS=2,
            LOOM_RUNTIME__PROCESS_ID=process_id,
            LOOM_RUNTIME__ADDRESSES=addresses,
            LOOM_STATE__DIR=tmp_path / f"state-{process_id}",  # a volume per pod
            LOOM_STATE__SNAPSHOT_INTERVAL_MS=200,
        )
        for process_id in (0, 1)
    ]
    source = PacedInput(cluster.bootstrap, topics["input"], keys=200, rate=1000, seconds=8)
    output, dead_letters = TopicTail(cluster, topics["output"]), TopicTail(cluster, topics["dlq"])
    source.start()
    with ServiceProcess(envs[0], APP) as first, ServiceProcess(envs[1], APP) as second:
        first.wait_ready(60)
        second.wait_ready(60)
        wait_until(
            lambda: sum(cluster.committed(group, topics["input"]).values()) > 2000,
            60,
            "the cluster to commit a part of the input",
        )
        first.kill()  # the other process loses its peer and exits 3
        assert second.wait() == 3
    source.join()
    expected = expected_windows(source.sent)
    with ServiceProcess(envs[0], APP) as first, ServiceProcess(envs[1], APP) as second:
        first.wait_ready(60)
        second.wait_ready(60)
        wait_until(
            lambda: {(t.key, t.start_ms) for t in emitted(output)} >= set(expected),
            90,
            "a result for every window that received records",
        )
        for process in (first, second):
            process.process.send_signal(signal.SIGTERM)
        assert first.wait() == 0
        assert second.wait() == 0
    settle(output)
    settle(dead_letters)
    results = emitted(output)
    wrong = [t for t in results if expected.get((t.key, t.start_ms)) != (t.count, t.id_sum)]
    assert not wrong, f"{len(wrong)} results differ from the input, e.g. {wrong[:3]}"
    assert {(t.key, t.start_ms) for t in results} == set(expected)
    assert dead_letters.records == []
    output.close()
    dead_letters.close()
