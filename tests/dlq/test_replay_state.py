"""The pieces of a replay that need no broker: times, job identity, state file, headers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from loom import dlq
from tests.dlq.support import envelope


def test_an_age_is_a_time_before_now() -> None:
    now = datetime(2026, 12, 1, 12, tzinfo=UTC)
    assert dlq.parse_time("90m", now) == now - timedelta(minutes=90)
    assert dlq.parse_time("2026-12-01T09:00:00") == datetime(2026, 12, 1, 9, tzinfo=UTC)


def test_an_invalid_time_names_the_accepted_forms() -> None:
    with pytest.raises(ValueError, match=r"ISO 8601 .* or an age"):
        dlq.parse_time("yesterday")


def test_a_job_with_an_age_keeps_its_name_as_time_passes() -> None:
    first = dlq.Filters.of(since="2h").as_json()
    later = dlq.Filters.of(since="2h").as_json()
    assert first == later
    assert first["since"] == "2h"


def test_the_state_file_is_replaced_whole_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "state" / "dlq-x.json"
    now = datetime.now(UTC)
    state = dlq.ReplayState(
        replay_id="r1",
        job={"dlq_topic": "x"},
        ends={0: 9},
        next={0: 3},
        started_at=now,
        updated_at=now,
    )
    dlq.save_state(path, state)
    state.next = {0: 9}
    dlq.save_state(path, state)
    loaded = dlq.load_state(path)
    assert loaded is not None
    assert loaded.next == {0: 9}
    assert [p.name for p in path.parent.iterdir()] == ["dlq-x.json"]  # no temp file left


def test_an_unreadable_state_file_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    path = tmp_path / "dlq-x.json"
    path.write_text("{truncated")
    with pytest.raises(dlq.DlqError, match="unreadable"):
        dlq.load_state(path)


def test_replay_headers_carry_the_attempt_of_the_dead_letter_once() -> None:
    item = envelope(1, attempt=2, headers=(("loom-attempt", b"1"),))
    headers = dlq.replay_headers(dlq.DeadLetter("orders.dlq", 0, 5, item), "rid")
    assert [v for k, v in headers if k == "loom-attempt"] == [b"2"]
    assert dict(headers)["loom-replay-dlq-offset"] == b"5"
    assert dict(headers)["trace"] == b"t-1"


def test_a_second_replay_of_the_same_job_is_refused_while_one_runs(tmp_path: Path) -> None:
    path = tmp_path / "dlq-x.json"
    with dlq.job_lock(path), pytest.raises(dlq.DlqError, match="another replay"):  # noqa: SIM117
        with dlq.job_lock(path):
            pass


def test_the_reader_joins_no_group_and_commits_nothing_whatever_the_service_sets() -> None:
    env = {
        "LOOM_KAFKA__BOOTSTRAP_SERVERS": "b1:9092",
        "LOOM_KAFKA__GROUP_ID": "orders-pricing",
        "LOOM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
        "LOOM_KAFKA__CONSUMER": '{"group.instance.id": "pod-0", "fetch.min.bytes": 1}',
    }
    kafka = dlq.kafka_settings(environ=env)
    first, second = dlq.consumer_config(kafka), dlq.consumer_config(kafka)
    assert first["bootstrap.servers"] == "b1:9092"
    assert first["security.protocol"] == "SASL_SSL"
    assert first["group.id"] != second["group.id"]
    assert first["group.id"].startswith("loom-dlq-")
    assert (first["enable.auto.commit"], first["enable.auto.offset.store"]) == (False, False)
    assert "group.instance.id" not in first
    assert first["fetch.min.bytes"] == 1


def test_without_brokers_the_commands_name_both_ways_to_give_them() -> None:
    with pytest.raises(dlq.DlqError, match=r"--bootstrap-servers or set LOOM_KAFKA__BOOTSTRAP"):
        dlq.kafka_settings(environ={})
