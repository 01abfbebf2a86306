"""Completion tracking: when is an input offset safe to commit?

Every input record gets an :class:`OffsetAck`. Each record derived from it
(the step result, each expand child, a batch containing it, a dead letter)
holds a reference and releases it when it reaches a terminal state: delivered,
dead-lettered or deliberately dropped. An offset becomes committable when its
ack is released *and* every earlier offset of the partition is too, so the
commit point never jumps over unfinished work.

All of this is worker-local: a Bytewax worker's records never leave its
thread (the adapter uses no exchanging operators), so no locks are needed.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable


class Ack:
    """A reference count of unfinished records derived from one origin."""

    __slots__ = ("pending",)

    def __init__(self) -> None:
        self.pending = 1

    def retain(self, count: int) -> None:
        """Account for ``count`` more derived records (e.g. expand children)."""
        self.pending += count

    def release(self, count: int = 1) -> None:
        """``count`` derived records reached a terminal state."""
        self.pending -= count
        if self.pending == 0:
            self._finished()

    def _finished(self) -> None:
        """Hook for acks that propagate completion."""


def release_all(acks: Iterable[Ack]) -> None:
    """Release every ack of ``acks`` once per occurrence.

    Records of one poll and partition share an ack, so counting first turns
    thousands of method calls into a handful.
    """
    for ack, count in Counter(acks).items():
        ack.release(count)


class OffsetAck(Ack):
    """The ack of consumed offsets of one partition, up to ``offset``.

    One ack covers the ``count`` records of a partition taken by one poll
    (an object per poll, not per record): it finishes when all of them have.
    """

    __slots__ = ("count", "offset")

    def __init__(self, offset: int, count: int = 1) -> None:
        self.pending = count
        self.offset = offset
        self.count = count


class GroupAck(Ack):
    """The ack of a batch: releases every member once all outputs finish."""

    __slots__ = ("members",)

    def __init__(self, members: list[Ack]) -> None:
        self.pending = 1
        self.members = members

    def _finished(self) -> None:
        for member in self.members:
            member.release()


class PartitionProgress:
    """Acks of one partition in consumption order."""

    __slots__ = ("_acks", "partition", "records", "uncommitted")

    def __init__(self, partition: int) -> None:
        self.partition = partition
        self._acks: deque[OffsetAck] = deque()
        self.records = 0
        """Records consumed and not yet finished."""
        self.uncommitted: int | None = None
        """The commit point reached but not yet committed, if any."""

    def track(self, last_offset: int, count: int = 1) -> OffsetAck:
        """Track ``count`` consecutive records ending at ``last_offset``."""
        ack = OffsetAck(last_offset, count)
        self._acks.append(ack)
        self.records += count
        return ack

    def advance(self) -> int:
        """Drop the finished prefix and return how many records remain in flight.

        Kafka's committed offset is the *next* offset to read, hence ``+ 1``.
        """
        acks = self._acks
        last = None
        while acks and acks[0].pending == 0:
            done = acks.popleft()
            self.records -= done.count
            last = done.offset
        if last is not None:
            self.uncommitted = last + 1
        return self.records


class WorkerProgress:
    """Completion state of every partition a worker reads."""

    __slots__ = ("_partitions",)

    def __init__(self) -> None:
        self._partitions: dict[int, PartitionProgress] = {}

    def partition(self, partition: int) -> PartitionProgress:
        progress = self._partitions.get(partition)
        if progress is None:
            progress = self._partitions[partition] = PartitionProgress(partition)
        return progress

    def advance(self) -> int:
        """Drop every partition's finished prefix; return the records still in flight.

        The source bounds what is in flight with this count.
        """
        return sum(progress.advance() for progress in self._partitions.values())

    def committable(self) -> dict[int, int]:
        """Partitions whose commit point moved since the last call, and where to."""
        moved: dict[int, int] = {}
        for partition, progress in self._partitions.items():
            progress.advance()
            if progress.uncommitted is not None:
                moved[partition] = progress.uncommitted
                progress.uncommitted = None
        return moved
