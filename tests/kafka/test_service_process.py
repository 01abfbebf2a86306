"""A service process under failure: SIGKILL, SIGTERM, scale-out, bad start-up."""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from pathlib import Path

import msgspec
import pytest

from tests.kafka.process import ServiceProcess, free_port, service_env
from tests.kafka.support import Cluster, wait_until
from tests.runtime.payloads import Enriched, Order


def orders_bytes(start: int, count: int) -> list[bytes]:
    return [msgspec.json.encode(Order(f"o{i}", float(i))) for i in range(start, start + count)]


def output_ids(cluster: Cluster, topic: str, expected: int) -> Counter[str]:
    records = cluster.read(topic, expected, timeout_s=60)
    return Counter(msgspec.json.decode(r.value(), type=Enriched).id for r in records)


def fresh_topics(cluster: Cluster, partitions: int) -> dict[str, str]:
    return {
        "input": cluster.topic(partitions, "in"),
        "output": cluster.topic(partitions, "out"),
        "dlq": cluster.topic(1, "dlq"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("recovery", [False, True], ids=["plain", "bytewax_recovery"])
def test_a_killed_service_loses_nothing_after_restart(
    cluster: Cluster, recovery: bool, tmp_path: Path
) -> None:
    total = 50_000
    topics = fresh_topics(cluster, 4)
    group = f"crash-{uuid.uuid4().hex[:6]}"
    extra: dict[str, object] = {"SERVICE_APP_SLOW_US": 50}
    if recovery:
        extra["LOOM_RUNTIME__RECOVERY__DB_DIR"] = tmp_path / "recovery"
        extra["LOOM_RUNTIME__EPOCH_INTERVAL_MS"] = 500
    env = service_env(cluster, topics, group, **extra)
    cluster.produce(topics["input"], orders_bytes(0, total), keys=[b"%d" % i for i in range(total)])
    ends = cluster.end_offsets(topics["input"], total)
    with ServiceProcess(env) as first:
        wait_until(
            lambda: sum(cluster.committed(group, topics["input"]).values()) >= total // 10,
            60,
            "the first process to commit a tenth of the input",
        )
        first.kill()  # SIGKILL mid-stream: no drain, no final commit
    killed_at = sum(cluster.committed(group, topics["input"]).values())
    assert killed_at < total
    with ServiceProcess(env) as second:
        second.wait_ready()
        wait_until(
            lambda: cluster.committed(group, topics["input"]) == ends,
            90,
            "the restarted process to commit every offset",
        )
        assert second.terminate() == 0
    ids = output_ids(cluster, topics["output"], total)
    assert set(ids) == {f"o{i}" for i in range(total)}
    duplicates = sum(ids.values()) - total
    print(
        f"\ncrash test ({'with' if recovery else 'without'} Bytewax recovery): killed after "
        f"{killed_at} of {total} offsets committed; {duplicates} duplicates after restart"
    )
    assert duplicates <= total - killed_at  # only the uncommitted window may repeat


def test_sigterm_drains_commits_and_exits_zero_and_a_restart_loses_nothing(
    cluster: Cluster,
) -> None:
    total = 3000
    topics = fresh_topics(cluster, 2)
    group = f"term-{uuid.uuid4().hex[:6]}"
    env = service_env(cluster, topics, group, SERVICE_APP_SLOW_US=1000)
    cluster.produce(topics["input"], orders_bytes(0, total))
    ends = cluster.end_offsets(topics["input"], total)
    with ServiceProcess(env) as service:
        wait_until(lambda: len(cluster.read(topics["output"], 1, timeout_s=1)) >= 1, 30, "output")
        assert service.terminate() == 0  # under load: records are still in flight
    committed = sum(cluster.committed(group, topics["input"]).values())
    delivered = sum(output_ids(cluster, topics["output"], committed).values())
    assert committed <= delivered  # nothing committed that was not delivered
    with ServiceProcess(env) as restarted:
        restarted.wait_ready()
        wait_until(
            lambda: cluster.committed(group, topics["input"]) == ends,
            60,
            "every offset committed after restart",
        )
        assert restarted.terminate() == 0
    ids = output_ids(cluster, topics["output"], total)
    assert set(ids) == {f"o{i}" for i in range(total)}
    assert sum(ids.values()) == total  # a graceful stop re-delivers nothing


def test_two_processes_of_two_workers_process_every_record_exactly_once(cluster: Cluster) -> None:
    total = 8000
    topics = fresh_topics(cluster, 8)
    group = f"scale-{uuid.uuid4().hex[:6]}"
    cluster.produce(topics["input"], orders_bytes(0, total), keys=[b"%d" % i for i in range(total)])
    ends = cluster.end_offsets(topics["input"], total)
    addresses = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    envs = [
        service_env(
            cluster,
            topics,
            group,
            LOOM_RUNTIME__WORKERS_PER_PROCESS=2,
            LOOM_RUNTIME__PROCESS_ID=process_id,
            LOOM_RUNTIME__ADDRESSES=addresses,
        )
        for process_id in (0, 1)
    ]
    with ServiceProcess(envs[0]) as first, ServiceProcess(envs[1]) as second:
        first.wait_ready(60)
        second.wait_ready(60)
        wait_until(
            lambda: cluster.committed(group, topics["input"]) == ends,
            60,
            "all 8 partitions committed to the end",
        )
        assert first.process.poll() is None
        assert second.process.poll() is None
        for process in (first, second):
            process.process.send_signal(signal.SIGTERM)
        assert first.wait() == 0
        assert second.wait() == 0
    ids = output_ids(cluster, topics["output"], total)
    assert len(ids) == total
    assert set(ids.values()) == {1}


def test_bad_settings_exit_with_code_2_naming_each_variable(cluster: Cluster) -> None:
    topics = fresh_topics(cluster, 1)
    env = service_env(
        cluster,
        topics,
        "g",
        LOOM_RUNTIME__WORKERS_PER_PROCESS="many",
        LOOM_RUNTIME__ASYNC_BACKEND="gevent",
        LOOM_KAFKA__CONSUMER="{not json",
        LOOM_KAFKA__SASL_PASSWORD="hunter2-secret",
    )
    with ServiceProcess(env) as service:
        assert service.wait() == 2
        stdout, stderr = service.output()
    lines = stderr.strip().splitlines()
    for variable in (
        "LOOM_RUNTIME__WORKERS_PER_PROCESS",
        "LOOM_RUNTIME__ASYNC_BACKEND",
        "LOOM_KAFKA__CONSUMER",
    ):
        assert sum(variable in line for line in lines) == 1
    assert "Traceback" not in stderr
    assert "hunter2-secret" not in stdout + stderr


def test_client_settings_librdkafka_rejects_exit_with_code_2_naming_the_variable(
    cluster: Cluster,
) -> None:
    env = service_env(
        cluster,
        fresh_topics(cluster, 1),
        "g",
        LOOM_KAFKA__CONSUMER='{"fetch.max.bytes": 1000}',  # below message.max.bytes
        LOOM_KAFKA__PRODUCER='{"no.such.property": 1}',
    )
    with ServiceProcess(env) as service:
        assert service.wait() == 2
        _, stderr = service.output()
    [consumer] = [line for line in stderr.splitlines() if "LOOM_KAFKA__CONSUMER" in line]
    [producer] = [line for line in stderr.splitlines() if "LOOM_KAFKA__PRODUCER" in line]
    assert "fetch.max.bytes" in consumer
    assert "no.such.property" in producer
    assert "Traceback" not in stderr


def test_a_missing_topic_stops_the_service_with_one_clear_error(cluster: Cluster) -> None:
    topics = fresh_topics(cluster, 1)
    topics["input"] = f"missing-{uuid.uuid4().hex[:6]}"
    with ServiceProcess(service_env(cluster, topics, "g")) as service:
        assert service.wait() == 1
        _, stderr = service.output()
    assert f"topics missing on {cluster.bootstrap}: {topics['input']}" in stderr
    assert "Traceback" not in stderr


def test_an_unreachable_broker_stops_the_service_with_one_clear_error(cluster: Cluster) -> None:
    topics = fresh_topics(cluster, 1)
    env = service_env(cluster, topics, "g")
    env["LOOM_KAFKA__BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"
    with ServiceProcess(env) as service:
        assert service.wait(timeout_s=60) == 1
        _, stderr = service.output()
    assert "cannot reach Kafka at 127.0.0.1:" in stderr
    assert "Traceback" not in stderr


def test_missing_topics_are_created_when_local_creation_is_enabled(cluster: Cluster) -> None:
    topics = {name: f"{name}-{uuid.uuid4().hex[:6]}" for name in ("input", "output", "dlq")}
    env = service_env(cluster, topics, "g", LOOM_KAFKA__CREATE_TOPICS="true")
    with ServiceProcess(env) as service:
        service.wait_ready()
        cluster.produce(topics["input"], orders_bytes(0, 5))
        assert len(output_ids(cluster, topics["output"], 5)) == 5
        assert service.terminate() == 0


def test_sigterm_while_waiting_for_an_unreachable_broker_stops_at_once(cluster: Cluster) -> None:
    env = service_env(cluster, fresh_topics(cluster, 1), "g", LOOM_LOG_LEVEL="INFO")
    env["LOOM_KAFKA__BOOTSTRAP_SERVERS"] = f"127.0.0.1:{free_port()}"  # nobody listens
    with ServiceProcess(env) as service:
        wait_until(lambda: "starting with" in service.output()[1], 30, "the start-up log line")
        service.process.send_signal(signal.SIGTERM)
        # The broker wait lasts 10 s; a stop must not wait it out.
        assert service.wait(timeout_s=2) == 0
        _, stderr = service.output()
    assert "Traceback" not in stderr
    assert "cannot reach Kafka" not in stderr


def test_a_lost_cluster_peer_stops_the_other_with_exit_3_and_a_restart_loses_nothing(
    cluster: Cluster,
) -> None:
    topics = fresh_topics(cluster, 4)
    group = f"peer-{uuid.uuid4().hex[:6]}"
    addresses = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"

    def envs() -> list[dict[str, str]]:
        return [
            service_env(
                cluster,
                topics,
                group,
                LOOM_RUNTIME__PROCESS_ID=process_id,
                LOOM_RUNTIME__ADDRESSES=addresses,
                SERVICE_APP_SLOW_US=200,
            )
            for process_id in (0, 1)
        ]

    cluster.produce(topics["input"], orders_bytes(0, 2000))
    first_env, second_env = envs()
    with ServiceProcess(first_env) as first, ServiceProcess(second_env) as second:
        first.wait_ready(60)
        second.wait_ready(60)
        second.kill()
        assert first.wait(timeout_s=30) == 3
        _, stderr = first.output()
    peer = addresses.split(",")[1]
    assert f"lost the Bytewax cluster peer process 1 at {peer}" in stderr
    assert "Traceback" not in stderr
    assert "PanicException" not in stderr

    cluster.produce(topics["input"], orders_bytes(2000, 1000))
    ends = cluster.end_offsets(topics["input"], 3000)
    first_env, second_env = envs()
    with ServiceProcess(first_env) as first, ServiceProcess(second_env) as second:
        wait_until(
            lambda: cluster.committed(group, topics["input"]) == ends,
            90,
            "the restarted cluster to commit every partition to the end",
        )
        for process in (first, second):  # a cluster stops together
            process.process.send_signal(signal.SIGTERM)
        assert (first.wait(), second.wait()) == (0, 0)
    assert set(output_ids(cluster, topics["output"], 3000)) == {f"o{i}" for i in range(3000)}


def test_a_misspelt_variable_and_a_bad_log_level_exit_with_code_2(cluster: Cluster) -> None:
    env = service_env(cluster, fresh_topics(cluster, 1), "g", LOOM_LOG_LEVEL="LOUD")
    env["LOOM_KAFKA__GROUPID"] = "g2"
    with ServiceProcess(env) as service:
        assert service.wait() == 2
        _, stderr = service.output()
    problems = [line.strip() for line in stderr.splitlines()[1:]]
    assert sorted(problems) == [
        "LOOM_KAFKA__GROUPID: unknown setting (did you mean LOOM_KAFKA__GROUP_ID?)",
        "LOOM_LOG_LEVEL='LOUD': expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
    ]
    assert "Traceback" not in stderr


def test_a_binding_for_a_topic_the_flow_does_not_declare_exits_with_code_2(
    cluster: Cluster,
) -> None:
    env = service_env(cluster, fresh_topics(cluster, 1), "g")
    env["LOOM_TOPICS__INPUTT"] = env["LOOM_TOPICS__INPUT"]
    with ServiceProcess(env) as service:
        assert service.wait() == 2
        _, stderr = service.output()
    [problem] = [line.strip() for line in stderr.splitlines()[1:]]
    assert problem.startswith(
        "LOOM_TOPICS__INPUTT (topics.inputt): the flow declares no logical topic 'inputt'; "
        "did you mean LOOM_TOPICS__INPUT?"
    )


def test_sigterm_while_waiting_for_the_cluster_peers_stops_at_once(cluster: Cluster) -> None:
    addresses = f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"
    env = service_env(
        cluster,
        fresh_topics(cluster, 2),
        "g",
        LOOM_LOG_LEVEL="INFO",
        LOOM_RUNTIME__PROCESS_ID=0,
        LOOM_RUNTIME__ADDRESSES=addresses,  # process 1 never starts
    )
    with ServiceProcess(env) as service:
        wait_until(lambda: "joining the Bytewax cluster" in service.output()[1], 30, "the join")
        service.process.send_signal(signal.SIGTERM)
        # Bytewax waits for the peer in Rust, where no signal handler runs.
        assert service.wait(timeout_s=3) == 0
        _, stderr = service.output()
    assert "stopped before any worker started" in stderr
    assert "Traceback" not in stderr
