"""Window results are exact after SIGKILLs: every record counted once, no window lost.

A windowed service (``tests.stateful.window_app``: count and id sum per key
and 1-second window) runs against paced real-time input while it is killed
with SIGKILL several times and restarted on the same state directory. Every
result it emitted is compared with an independent computation from the
input: a result may be emitted again (whole), but never with a wrong value,
and every (key, window) that received records has its result.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.kafka.process import ServiceProcess, service_env
from tests.kafka.support import Cluster, TopicTail, wait_until
from tests.stateful.support import PacedInput, emitted, expected_windows, settle

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
