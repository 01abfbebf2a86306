"""Bytewax recovery composes with Loom's commits."""

from __future__ import annotations

from pathlib import Path

from loom.streaming.bytewax.runner import BytewaxRecoverySettings, BytewaxRuntimeConfig
from loom.streaming.testing import TestRunner
from tests.runtime.payloads import enrich_flow, orders


def recovering(db_dir: Path) -> BytewaxRuntimeConfig:
    return BytewaxRuntimeConfig(recovery=BytewaxRecoverySettings(str(db_dir)), epoch_interval_ms=50)


def test_a_recovery_enabled_run_keeps_reading_a_live_input(tmp_path: Path) -> None:
    tester = TestRunner(enrich_flow())
    tester.send_all(orders(5))

    def send_more_once_the_first_are_out(result):  # type: ignore[no-untyped-def]
        if len(result.records("output")) == 5 and len(tester.broker.records("input")) == 5:
            tester.send_all(orders(5, start=5))
        return len(result.records("output")) < 10

    result = tester.run(
        runtime=recovering(tmp_path / "db"), until=lambda r: not send_more_once_the_first_are_out(r)
    )
    assert len(result.records("output")) == 10
    assert result.committed("input") == {0: 10}


def test_recovery_partitions_are_created_on_first_start(tmp_path: Path) -> None:
    tester = TestRunner(enrich_flow())
    tester.send_all(orders(3))
    tester.run(runtime=recovering(tmp_path / "db"))
    assert sorted(p.name for p in (tmp_path / "db").iterdir()) == ["part-0.sqlite3"]


def test_a_restart_with_recovery_resumes_from_the_commits(tmp_path: Path) -> None:
    tester = TestRunner(enrich_flow())
    tester.send_all(orders(3))
    tester.run(runtime=recovering(tmp_path / "db"))
    tester.send_all(orders(2, start=3))
    result = tester.run(runtime=recovering(tmp_path / "db"))
    assert len(result.records("output")) == 5
    assert result.committed("input") == {0: 5}
