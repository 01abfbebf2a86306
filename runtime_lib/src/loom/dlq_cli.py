"""``loom dlq inspect`` and ``loom dlq replay``: a dead-letter topic as a workflow.

Both read the service's ``LOOM_KAFKA__*`` variables (run them inside the
service's pod as they are), take ``--bootstrap-servers`` over them, and
never join or commit a consumer group (see :mod:`loom.dlq`).

Exit codes: 0 done; 1 a problem (named on stderr: broker or topic missing, a
delivery failed, dead letters that could not be replayed); 2 invalid
arguments or settings; 130 interrupted (a replay resumes when run again).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loom.dlq import (
    DlqError,
    Filters,
    Replay,
    ReplayOutcome,
    Summary,
    Undecodable,
    default_state_dir,
    kafka_settings,
    parse_time,
    read_letters,
    stop_on_signals,
    summarise,
)
from loom.errors import SettingsError
from loom.streaming.errors import ErrorKind

PROGRESS_MIN_RECORDS = 10_000
"""A progress bar (on a terminal's stderr) for topics at least this large."""


def _time(text: str) -> str:
    """Checked here, kept as text: a replay job is named by ``2h``, not by a moment."""
    try:
        parse_time(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}: a positive integer")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid rate {text!r}: records per second, > 0")
    return value


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dlq_topic", metavar="DLQ_TOPIC", help="the dead-letter topic")
    parser.add_argument(
        "--bootstrap-servers",
        help="brokers host:port[,host:port] (default: LOOM_KAFKA__BOOTSTRAP_SERVERS)",
    )
    select = parser.add_argument_group("filters (repeat one to allow several values)")
    select.add_argument(
        "--kind", action="append", choices=[k.value for k in ErrorKind], help="error kind"
    )
    select.add_argument("--node", action="append", help="node that failed the record")
    select.add_argument("--exception", action="append", help="exception type, e.g. ValueError")
    select.add_argument("--source-topic", action="append", help="topic the record came from")
    select.add_argument(
        "--since", type=_time, help="failed at or after: ISO 8601 time or an age (30m, 2h, 7d)"
    )
    select.add_argument("--until", type=_time, help="failed before: ISO 8601 time or an age")


def _filters(args: argparse.Namespace) -> Filters:
    return Filters.of(
        kind=args.kind,
        node=args.node,
        exception=args.exception,
        source_topic=args.source_topic,
        since=args.since,
        until=args.until,
    )


@contextmanager
def _progress(what: str) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
    """``(on_start, on_batch)`` callbacks driving a rich progress bar on stderr."""
    if not sys.stderr.isatty():
        yield (lambda _: None), (lambda _: None)
        return
    from rich.progress import Progress  # noqa: PLC0415 - only on a terminal

    with Progress(transient=True, console=None, redirect_stdout=False) as bar:
        task: list[Any] = []

        def on_start(total: int) -> None:
            if total >= PROGRESS_MIN_RECORDS:
                task.append(bar.add_task(what, total=total))

        def on_batch(count: int) -> None:
            if task:
                bar.advance(task[0], count)

        yield on_start, on_batch


def _inspect(args: argparse.Namespace) -> int:
    kafka = kafka_settings(args.bootstrap_servers)
    undecodable: list[Undecodable] = []
    with _progress(f"reading {args.dlq_topic}") as (on_start, on_batch):
        letters = read_letters(
            args.dlq_topic,
            kafka,
            _filters(args),
            undecodable=undecodable,
            on_start=on_start,
            on_batch=on_batch,
        )
        summary = summarise(letters, args.dlq_topic, undecodable)
    if args.json:
        print(json.dumps(summary.as_json(), indent=2))
    else:
        _print_summary(summary)
    return 0


def _print_summary(summary: Summary) -> None:
    print(f"{summary.topic}: {summary.total} dead letters in {len(summary.groups)} groups")
    for group in summary.sorted_groups():
        data = group.as_json()
        sources = ", ".join(
            f"{t}[{','.join(map(str, p))}]" for t, p in data["source_topics"].items()
        )
        print()
        print(f"{group.count:>8}  {group.kind} / {group.node} / {group.exception_type}")
        print(f"          first {data['first_seen']}  last {data['last_seen']}")
        print(f"          from {sources or '-'}  attempts {data['attempts']}")
        sample = data["sample"] or {}
        print(
            f"          e.g. {summary.topic}[{sample.get('dlq_partition')}]"
            f"@{sample.get('dlq_offset')}: {sample.get('message')}"
        )
        print(f"               key {sample.get('key')!r}  value {sample.get('value')!r}")
    if summary.undecodable:
        first = summary.undecodable[0]
        print(
            f"\n{len(summary.undecodable)} records are not Loom envelopes "
            f"(first: [{first.partition}]@{first.offset}: {first.error})"
        )


def _replay(args: argparse.Namespace) -> int:
    kafka = kafka_settings(args.bootstrap_servers)
    replay = Replay(
        args.dlq_topic,
        kafka,
        to=args.to,
        filters=_filters(args),
        limit=args.limit,
        rate=args.rate,
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(),
        dry_run=args.dry_run,
    )
    with stop_on_signals(replay):
        outcome = replay.run()
    return _report(outcome, args.dry_run)


def _report(outcome: ReplayOutcome, dry_run: bool) -> int:
    state = outcome.state
    verb = "would replay" if dry_run else "replayed"
    if outcome.already_complete:
        print(
            f"replay {state.replay_id} is already complete ({state.replayed} replayed): "
            f"nothing to do; state {outcome.path} (remove it to replay again)"
        )
    else:
        print(
            f"{verb} {outcome.this_run} dead letters this run; job {state.replay_id}: "
            f"{state.replayed} replayed, {state.not_selected} not selected, "
            f"{state.unroutable} without a source topic, {state.undecodable} not envelopes"
            + ("" if dry_run else f"; state {outcome.path}")
        )
    if outcome.problem:
        print(f"loom dlq replay: {outcome.problem}; run again to resume", file=sys.stderr)
        return 1
    if outcome.interrupted:
        print("loom dlq replay: interrupted; run the same command to resume", file=sys.stderr)
        return 130
    problems = []
    if state.unroutable:
        problems.append(f"{state.unroutable} dead letters have no source topic (use --to)")
    if state.undecodable:
        problems.append(f"{state.undecodable} records of the topic are not Loom envelopes")
    if problems:
        print(f"loom dlq replay: {'; '.join(problems)}", file=sys.stderr)
        return 1
    return 0


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        name = f"loom dlq {args.dlq_command}"
        try:
            return handler(args)
        except SettingsError as exc:
            for line in exc.problems:
                print(f"{name}: {line}", file=sys.stderr)
            return 2
        except DlqError as exc:
            print(f"{name}: {exc}", file=sys.stderr)
            return 1

    return run


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``loom dlq inspect`` and ``loom dlq replay``."""
    dlq = commands.add_parser(
        "dlq",
        help="inspect a dead-letter topic, replay fixed records",
        description="Dead letters as a workflow. Reads LOOM_KAFKA__* like the service; "
        "joins no consumer group and commits nothing.",
    )
    sub = dlq.add_subparsers(
        dest="dlq_command", required=True, metavar="SUBCOMMAND", help="inspect or replay"
    )
    inspect = sub.add_parser(
        "inspect",
        help="summarise dead letters by kind, node and exception",
        description="Read the topic to its end at start and group its dead letters by "
        "kind, node and exception type: count, first and last seen, source topics and "
        "partitions, one sample.",
    )
    _common(inspect)
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(handler=_guarded(_inspect))

    replay = sub.add_parser(
        "replay",
        help="re-produce dead letters' original records",
        description="Re-produce each selected dead letter's original key, value and "
        "headers (not the envelope), marked with loom-replay-* headers and loom-attempt. "
        "Progress is kept in a state file: an interrupted replay resumes, a completed "
        "one replays nothing.",
    )
    _common(replay)
    where = replay.add_mutually_exclusive_group(required=True)
    where.add_argument("--to", metavar="TOPIC", help="replay to this topic")
    where.add_argument(
        "--to-source",
        action="store_true",
        help="replay each record to the topic (and partition) it came from",
    )
    replay.add_argument(
        "--dry-run", action="store_true", help="write nothing; print what would be replayed"
    )
    replay.add_argument(
        "--limit", type=_positive_int, help="replay at most this many (over all resumes)"
    )
    replay.add_argument("--rate", type=_positive_float, help="at most this many records/s")
    replay.add_argument(
        "--state-dir",
        help="folder of the replay state files (default: $XDG_STATE_HOME/loom/dlq-replay "
        "when set, else ./.loom-dlq-replay)",
    )
    replay.set_defaults(handler=_guarded(_replay))
