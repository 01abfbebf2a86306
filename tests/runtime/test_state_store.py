"""Where state is kept: a directory per flow, one SQLite file per worker, or nowhere (refused)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from loom.errors import StateLayoutError
from loom.service import run_service
from loom.streaming import (
    Count,
    FromTopic,
    IntoTopic,
    Process,
    StreamFlow,
    Tumbling,
    WindowAggregate,
)
from loom.streaming.bytewax.state import AppliedOffsets, Change, Delta, SqliteStateStore
from loom.streaming.testing import TestRunner

FLOW = StreamFlow(
    "tally",
    source=FromTopic("input"),
    process=Process(WindowAggregate(Tumbling(1000), Count())),
    output=IntoTopic("output"),
    errors=IntoTopic("dlq"),
)
ENV = {
    "LOOM_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9",
    "LOOM_KAFKA__GROUP_ID": "tally",
    "LOOM_TOPICS__INPUT": "in",
    "LOOM_TOPICS__OUTPUT": "out",
    "LOOM_TOPICS__DLQ": "dlq",
}


META = ((0, b"", -1), 5, 5)


def delta(node: str, partition: int, entries: dict[object, object], *, base: bool = False) -> Delta:
    updates = {k: v for k, v in entries.items() if v is not None}
    deletes = [k for k, v in entries.items() if v is None]
    return {node: {partition: Change(pickle.dumps((updates, deletes, META)), base)}}


def test_a_saved_snapshot_is_read_back_by_a_new_store(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path, workers=2)
    store.save(1, delta("n", 3, {b"a": 1, b"b": 2}))
    store.save(1, delta("n", 3, {b"a": None, b"c": 3}))
    store.close()
    loaded = SqliteStateStore(tmp_path, workers=2).load(1)
    assert loaded["n"][3] == ({b"b": 2, b"c": 3}, META)
    assert SqliteStateStore(tmp_path, workers=2).load(0) == {}


def test_a_base_replaces_the_changes_before_it(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path, workers=1)
    store.save(0, delta("n", 0, {b"a": 1, b"b": 2}))
    store.save(0, delta("n", 0, {b"c": 3}, base=True))
    store.save(0, delta("n", 0, {b"d": 4}))
    assert store.load(0)["n"][0] == ({b"c": 3, b"d": 4}, META)
    rows = store._connection(0).execute("SELECT count(*) FROM changes").fetchone()
    assert rows == (2,)


def test_state_written_by_another_number_of_workers_is_refused(tmp_path: Path) -> None:
    SqliteStateStore(tmp_path, workers=2).save(0, delta("n", 0, {b"a": 1}))
    with pytest.raises(StateLayoutError, match="written by 2 workers and this run has 4"):
        SqliteStateStore(tmp_path, workers=4)


def test_a_testrunner_can_keep_its_state_in_a_directory(tmp_path: Path) -> None:
    config = {"state": {"dir": str(tmp_path)}}
    tester = TestRunner(FLOW, config=config)
    tester.send({"n": 1}, key="a", timestamp_ms=10)
    tester.run()
    assert [p.name for p in (tmp_path / "tally").iterdir() if p.suffix == ".sqlite3"] == [
        "worker-0-of-1.sqlite3"
    ]
    again = TestRunner(FLOW, config=config, broker=tester.broker)  # a new process, same volume
    assert again.run(advance_ms=1000).values("output")[0]["value"] == 1


def test_applied_offsets_remember_out_of_order_offsets_and_forget_committed_ones() -> None:
    applied = AppliedOffsets()
    for offset in (0, 1, 5, 3):
        applied.mark(offset)
    assert [applied.seen(offset) for offset in range(7)] == [1, 1, 0, 1, 0, 1, 0]
    applied.prune(16)  # committed up to 16: every earlier offset counts as seen
    assert applied.seen(2)
    assert not applied.seen(17)


def test_a_stateful_service_without_a_state_directory_exits_2_naming_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run_service(FLOW, environ=ENV) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "LOOM_STATE__DIR" in line]
    assert "window_count" in line
    assert "LOOM_STATE__DURABILITY=volatile" in line


def test_state_of_another_number_of_workers_stops_the_service_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    SqliteStateStore(tmp_path / "tally", workers=3).save(0, {})
    assert run_service(FLOW, environ={**ENV, "LOOM_STATE__DIR": str(tmp_path)}) == 2
    assert "written by 3 workers and this run has 1" in capsys.readouterr().err
