"""``loom dlq inspect`` / ``replay`` and ``loom.dlq.read`` against the real (Tansu) broker."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from loom import dlq
from loom.cli import main
from loom.streaming import ErrorEnvelope, ErrorKind, RecordStep
from loom.streaming.bytewax.runner import StreamingRunner
from tests.dlq.support import envelope, loom_dlq, write_dead_letters
from tests.kafka.support import BackgroundRun, Cluster, TopicTail, wait_until
from tests.runtime.payloads import Order, enrich, enrich_flow


def price(order: Order) -> Order:
    if order.amount < 0:
        raise ValueError("negative amount")  # the bug: refunds are negative
    return order


def price_fixed(order: Order) -> Order:
    return Order(order.id, abs(order.amount))


def orders_json(ids_amounts: list[tuple[str, float]]) -> list[bytes]:
    return [msgspec.json.encode(Order(i, a)) for i, a in ids_amounts]


def state_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.json"))


def read_state(folder: Path) -> dict[str, Any]:
    [path] = state_files(folder)
    data: dict[str, Any] = json.loads(path.read_bytes())
    return data


# ------------------------------------------------------------------ the workflow


def test_poison_records_replayed_after_the_fix_reach_the_output(
    cluster: Cluster, tmp_path: Path
) -> None:
    topics = {name: cluster.topic(1, name) for name in ("input", "output", "dlq")}
    config = cluster.flow_config(topics)
    output = TopicTail(cluster, topics["output"])
    dead = TopicTail(cluster, topics["dlq"])
    good = [(f"g{i}", float(i)) for i in range(6)]
    refunds = [(f"r{i}", -float(i + 1)) for i in range(3)]
    values = orders_json(good + refunds)
    cluster.produce(topics["input"], values, keys=[i.encode() for i, _ in good + refunds])
    broken = StreamingRunner.from_dict(enrich_flow(RecordStep(price), RecordStep(enrich)), config)
    with BackgroundRun(broken):
        wait_until(lambda: len(dead.poll()) == 3, 30, "3 dead letters")
        wait_until(lambda: len(output.poll()) == 6, 30, "6 outputs")
    fixed = enrich_flow(RecordStep(price_fixed), RecordStep(enrich))
    with BackgroundRun(StreamingRunner.from_dict(fixed, config)):
        code = main(
            [
                "dlq",
                "replay",
                topics["dlq"],
                "--to-source",
                "--bootstrap-servers",
                cluster.bootstrap,
                "--state-dir",
                str(tmp_path),
            ]
        )
        assert code == 0
        wait_until(lambda: len(output.poll()) == 9, 30, "the 3 replayed refunds as outputs")
    replayed = {m.key(): msgspec.json.decode(m.value()) for m in output.records[6:]}
    assert replayed == {b"r0": {"id": "r0", "amount": 1.0, "large": False}} | {
        b"r1": {"id": "r1", "amount": 2.0, "large": False},
        b"r2": {"id": "r2", "amount": 3.0, "large": False},
    }
    assert len(dead.poll()) == 3  # nothing failed again
    output.close()
    dead.close()


def test_a_replayed_record_that_fails_again_is_dead_lettered_with_the_next_attempt(
    cluster: Cluster, tmp_path: Path
) -> None:
    topics = {name: cluster.topic(1, name) for name in ("input", "output", "dlq")}
    dead = TopicTail(cluster, topics["dlq"])
    cluster.produce(topics["input"], orders_json([("r0", -1.0)]), keys=[b"r0"])
    broken = enrich_flow(RecordStep(price), RecordStep(enrich))
    with BackgroundRun(StreamingRunner.from_dict(broken, cluster.flow_config(topics))):
        wait_until(lambda: len(dead.poll()) == 1, 30, "the first dead letter")
        args = [topics["dlq"], "--to-source", "--state-dir", str(tmp_path)]
        assert main(["dlq", "replay", *args, "--bootstrap-servers", cluster.bootstrap]) == 0
        wait_until(lambda: len(dead.poll()) == 2, 30, "the replay's dead letter")
    first, second = (msgspec.json.decode(m.value(), type=ErrorEnvelope) for m in dead.records)
    assert (first.attempt, second.attempt) == (1, 2)
    assert second.value == first.value
    assert second.key == first.key
    replay_headers = dict(second.headers)
    assert replay_headers["loom-replay-dlq-offset"] == b"0"
    assert replay_headers["loom-replay-id"] == read_state(tmp_path)["replay_id"].encode()
    dead.close()


# ------------------------------------------------------------------ resume


def test_a_sigkilled_replay_resumes_without_loss_and_duplicates_only_its_last_window(
    cluster: Cluster, tmp_path: Path
) -> None:
    source, target = cluster.topic(1, "dlq"), cluster.topic(1, "dest")
    total, rate = 60, 30
    write_dead_letters(cluster.bootstrap, source, [envelope(i) for i in range(total)])
    args = ("replay", source, "--to", target, "--state-dir", str(tmp_path))
    slow = loom_dlq(
        *args, "--rate", str(rate), bootstrap=cluster.bootstrap, cwd=tmp_path, wait=False
    )
    assert isinstance(slow, subprocess.Popen)
    try:
        wait_until(
            lambda: bool(state_files(tmp_path)) and read_state(tmp_path)["replayed"] >= 15,
            30,
            "15 replayed records checkpointed",
        )
        slow.send_signal(signal.SIGKILL)
        slow.wait(10)
    finally:
        if slow.poll() is None:
            slow.kill()
    checkpointed = read_state(tmp_path)["replayed"]
    assert checkpointed < total, "the replay finished before it was killed"
    produced = len(cluster.read(target, checkpointed, timeout_s=5))
    resumed = loom_dlq(*args, bootstrap=cluster.bootstrap, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    records = cluster.read(target, total + produced - checkpointed)
    keys = [m.key() for m in records]
    assert set(keys) == {b"k-%d" % i for i in range(total)}  # nothing lost
    duplicates = len(keys) - total
    assert duplicates == produced - checkpointed  # only what was sent after the checkpoint
    assert duplicates <= rate * dlq.CHECKPOINT_S + 2


def test_running_a_completed_replay_again_replays_nothing(cluster: Cluster, tmp_path: Path) -> None:
    source, target = cluster.topic(1, "dlq"), cluster.topic(1, "dest")
    write_dead_letters(cluster.bootstrap, source, [envelope(i) for i in range(5)])
    args = ("replay", source, "--to", target, "--state-dir", str(tmp_path))
    first = loom_dlq(*args, bootstrap=cluster.bootstrap, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    second = loom_dlq(*args, bootstrap=cluster.bootstrap, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert "already complete" in second.stdout
    assert len(cluster.read(target, 5, timeout_s=5)) == 5


def test_a_sigint_stops_a_replay_that_resumes_where_it_stopped(
    cluster: Cluster, tmp_path: Path
) -> None:
    source, target = cluster.topic(1, "dlq"), cluster.topic(1, "dest")
    write_dead_letters(cluster.bootstrap, source, [envelope(i) for i in range(40)])
    args = ("replay", source, "--to", target, "--state-dir", str(tmp_path))
    slow = loom_dlq(*args, "--rate", "20", bootstrap=cluster.bootstrap, cwd=tmp_path, wait=False)
    try:
        wait_until(
            lambda: bool(state_files(tmp_path)) and read_state(tmp_path)["replayed"] >= 5,
            30,
            "5 replayed records checkpointed",
        )
        slow.send_signal(signal.SIGINT)
        _, stderr = slow.communicate(timeout=30)
    finally:
        if slow.poll() is None:
            slow.kill()
    assert slow.returncode == 130
    assert "resume" in stderr
    stopped_at = read_state(tmp_path)["replayed"]
    assert len(cluster.read(target, stopped_at, timeout_s=5)) == stopped_at  # all confirmed
    resumed = loom_dlq(*args, bootstrap=cluster.bootstrap, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    keys = [m.key() for m in cluster.read(target, 40)]
    assert sorted(keys) == sorted(b"k-%d" % i for i in range(40))  # no loss, no duplicate


# ------------------------------------------------------------------ filters, dry run


@pytest.fixture
def mixed_dlq(cluster: Cluster) -> str:
    """4 TASK dead letters of node price, 2 WIRE of node decode, 1 BUSINESS from another topic."""
    topic = cluster.topic(1, "dlq")
    letters = [envelope(i) for i in range(4)]
    letters += [
        envelope(i, kind=ErrorKind.WIRE, node="decode", exception_type="DecodeError")
        for i in range(4, 6)
    ]
    letters += [envelope(6, kind=ErrorKind.BUSINESS, exception_type="Refused", source="returns")]
    write_dead_letters(cluster.bootstrap, topic, letters)
    return topic


def test_a_dry_run_writes_nothing_and_lists_what_it_would_replay(
    cluster: Cluster, mixed_dlq: str, tmp_path: Path
) -> None:
    target = cluster.topic(1, "dest")
    args = ("replay", mixed_dlq, "--to", target, "--kind", "wire", "--dry-run")
    result = loom_dlq(
        *args, "--state-dir", str(tmp_path), bootstrap=cluster.bootstrap, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"would replay {mixed_dlq}[") == 2
    assert "key k-4" in result.stdout
    assert "key k-5" in result.stdout
    assert not state_files(tmp_path)
    assert cluster.read(target, 0, timeout_s=1) == []


def test_replay_filters_and_limit_select_the_records_replayed(
    cluster: Cluster, mixed_dlq: str, tmp_path: Path
) -> None:
    target = cluster.topic(1, "dest")
    args = ["dlq", "replay", mixed_dlq, "--to", target, "--node", "price", "--limit", "3"]
    assert (
        main([*args, "--bootstrap-servers", cluster.bootstrap, "--state-dir", str(tmp_path)]) == 0
    )
    keys = [m.key() for m in cluster.read(target, 3)]
    assert keys == [b"k-0", b"k-1", b"k-2"]  # node price: TASK 0-3 and BUSINESS 6; first 3


def test_replay_to_source_uses_the_topic_named_in_each_envelope(
    cluster: Cluster, tmp_path: Path
) -> None:
    orders, returns, source = (
        cluster.topic(1, "orders"),
        cluster.topic(1, "returns"),
        cluster.topic(1, "dlq"),
    )
    letters = [envelope(0, source=orders), envelope(1, source=returns), envelope(2, source=orders)]
    write_dead_letters(cluster.bootstrap, source, letters)
    args = ["dlq", "replay", source, "--to-source", "--source-topic", orders]
    assert (
        main([*args, "--bootstrap-servers", cluster.bootstrap, "--state-dir", str(tmp_path)]) == 0
    )
    assert [m.key() for m in cluster.read(orders, 2)] == [b"k-0", b"k-2"]
    assert cluster.read(returns, 0, timeout_s=1) == []


def test_replay_to_source_of_a_record_without_source_exits_1_naming_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    source = cluster.topic(1, "dlq")
    write_dead_letters(cluster.bootstrap, source, [envelope(0, source=None)])
    result = loom_dlq(
        "replay",
        source,
        "--to-source",
        "--state-dir",
        str(tmp_path),
        bootstrap=cluster.bootstrap,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "no source topic" in result.stderr


def test_a_missing_destination_stops_the_replay_before_it_and_a_rerun_resumes_there(
    cluster: Cluster, tmp_path: Path
) -> None:
    orders, source = cluster.topic(1, "orders"), cluster.topic(1, "dlq")
    later = f"later-{uuid.uuid4().hex[:8]}"
    letters = [envelope(0, source=orders), envelope(1, source=later), envelope(2, source=orders)]
    write_dead_letters(cluster.bootstrap, source, letters)
    args = ("replay", source, "--to-source", "--state-dir", str(tmp_path))
    stopped = loom_dlq(*args, bootstrap=cluster.bootstrap, cwd=tmp_path)
    assert stopped.returncode == 1
    assert f"topic {later!r} does not exist" in stopped.stderr
    assert read_state(tmp_path)["next"] == {"0": 1}  # k-0 confirmed, nothing past k-1
    from confluent_kafka.admin import NewTopic

    cluster.admin.create_topics([NewTopic(later, 1)])[later].result()
    resumed = loom_dlq(*args, bootstrap=cluster.bootstrap, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [m.key() for m in cluster.read(orders, 2)] == [b"k-0", b"k-2"]
    assert [m.key() for m in cluster.read(later, 1)] == [b"k-1"]


def test_dead_letters_written_after_a_job_started_are_not_part_of_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    source, target = cluster.topic(1, "dlq"), f"dest-{uuid.uuid4().hex[:8]}"
    write_dead_letters(cluster.bootstrap, source, [envelope(i) for i in range(3)])
    args = ("replay", source, "--to", target, "--state-dir", str(tmp_path))
    failed = loom_dlq(*args, bootstrap=cluster.bootstrap, cwd=tmp_path)
    assert failed.returncode == 1  # the destination does not exist yet: the job started
    assert read_state(tmp_path)["ends"] == {"0": 3}
    write_dead_letters(cluster.bootstrap, source, [envelope(i) for i in range(3, 5)])
    from confluent_kafka.admin import NewTopic

    cluster.admin.create_topics([NewTopic(target, 1)])[target].result()
    resumed = loom_dlq(*args, bootstrap=cluster.bootstrap, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [m.key() for m in cluster.read(target, 3)] == [b"k-0", b"k-1", b"k-2"]


# ------------------------------------------------------------------ inspect


def test_inspect_json_groups_by_kind_node_and_exception(
    cluster: Cluster, mixed_dlq: str, tmp_path: Path
) -> None:
    result = loom_dlq("inspect", mixed_dlq, "--json", bootstrap=cluster.bootstrap, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["total"] == 7
    groups = {(g["kind"], g["node"], g["exception_type"]): g for g in summary["groups"]}
    assert {k: g["count"] for k, g in groups.items()} == {
        ("task", "price", "ValueError"): 4,
        ("wire", "decode", "DecodeError"): 2,
        ("business", "price", "Refused"): 1,
    }
    task = groups["task", "price", "ValueError"]
    assert task["first_seen"] <= task["last_seen"]
    assert task["source_topics"] == {"orders": [0]}
    assert task["sample"]["value"] == '{"n": 0}'
    assert groups["business", "price", "Refused"]["source_topics"] == {"returns": [0]}


def test_inspect_filters_narrow_the_summary(
    cluster: Cluster, mixed_dlq: str, tmp_path: Path
) -> None:
    args = ("inspect", mixed_dlq, "--json", "--node", "price", "--exception", "ValueError")
    result = loom_dlq(*args, bootstrap=cluster.bootstrap, cwd=tmp_path)
    summary = json.loads(result.stdout)
    assert summary["total"] == 4
    assert [g["kind"] for g in summary["groups"]] == ["task"]


def test_inspect_since_and_until_select_by_failure_time(cluster: Cluster, tmp_path: Path) -> None:
    topic = cluster.topic(1, "dlq")
    day = datetime(2026, 11, 30, tzinfo=UTC)
    hours = [envelope(i, occurred_at=day + timedelta(hours=i)) for i in range(6)]
    write_dead_letters(cluster.bootstrap, topic, hours)
    window = ("--since", "2026-11-30T02:00:00Z", "--until", "2026-11-30T05:00:00+00:00")
    result = loom_dlq(
        "inspect", topic, "--json", *window, bootstrap=cluster.bootstrap, cwd=tmp_path
    )
    [group] = json.loads(result.stdout)["groups"]
    assert group["count"] == 3
    assert group["first_seen"] == "2026-11-30T02:00:00+00:00"
    assert group["last_seen"] == "2026-11-30T04:00:00+00:00"


def test_inspect_of_a_missing_topic_exits_1_naming_it(cluster: Cluster, tmp_path: Path) -> None:
    missing = f"nope-{uuid.uuid4().hex[:6]}"
    result = loom_dlq("inspect", missing, bootstrap=cluster.bootstrap, cwd=tmp_path)
    assert result.returncode == 1
    assert f"topic {missing!r} does not exist" in result.stderr


# ------------------------------------------------------------------ API, other clients


def test_read_yields_envelopes_with_the_original_bytes(cluster: Cluster, mixed_dlq: str) -> None:
    letters = list(dlq.read(mixed_dlq, bootstrap_servers=cluster.bootstrap, kind="wire"))
    assert all(isinstance(item, ErrorEnvelope) for item in letters)
    assert [(e.key, e.value) for e in letters] == [(b"k-4", b'{"n": 4}'), (b"k-5", b'{"n": 5}')]


@pytest.mark.filterwarnings("ignore:(read|open)_text is deprecated:DeprecationWarning")
def test_kafka_python_reads_the_replay_and_interop_headers(
    cluster: Cluster, tmp_path: Path
) -> None:
    from kafka import KafkaConsumer, TopicPartition

    source, target = cluster.topic(1, "dlq"), cluster.topic(1, "dest")
    write_dead_letters(cluster.bootstrap, source, [envelope(7)])
    args = ["dlq", "replay", source, "--to", target, "--state-dir", str(tmp_path)]
    assert main([*args, "--bootstrap-servers", cluster.bootstrap]) == 0

    def first_record(topic: str) -> Any:
        consumer = KafkaConsumer(bootstrap_servers=cluster.bootstrap, enable_auto_commit=False)
        try:
            consumer.assign([TopicPartition(topic, 0)])
            consumer.seek_to_beginning()
            found: list[Any] = []
            wait_until(
                lambda: bool(
                    found.extend(r for rs in consumer.poll(200).values() for r in rs) or found
                ),
                30,
                f"a record of {topic} through kafka-python",
            )
            return found[0]
        finally:
            consumer.close()

    replayed = dict(first_record(target).headers)
    assert replayed["loom-replay-dlq-topic"] == source.encode()
    assert replayed["loom-replay-dlq-offset"] == b"0"
    assert replayed["loom-attempt"] == b"1"
    assert replayed["trace"] == b"t-7"  # the original headers, not the envelope's
    letter = dict(first_record(source).headers)
    assert letter["__streams.errors.exception"] == b"ValueError"
    assert struct.unpack(">q", letter["kafka_dlt-original-offset"]) == (7,)
