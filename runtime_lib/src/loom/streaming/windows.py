"""Event-time windows and aggregates for :class:`~loom.streaming.WindowAggregate`.

Windows say which windows a record belongs to, by its event time (epoch
milliseconds); aggregates say how records fold into one result per key and
window. Both are plain values: nothing here does I/O or keeps state.

Tumbling and hopping windows are aligned to the Unix epoch, so a window's
bounds depend only on its size (and step), never on when a run started::

    >>> Tumbling(60_000).windows_of(90_500)
    [Window(start_ms=60000, end_ms=120000)]
    >>> Hopping(60_000, 30_000).windows_of(90_500)
    [Window(start_ms=60000, end_ms=120000), Window(start_ms=90000, end_ms=150000)]

A window covers ``start_ms <= t < end_ms``. An aggregate is any object with
``initial() -> A``, ``add(acc, value) -> A`` and ``result(key, window, acc)``;
session windows also need ``merge(a, b) -> A``, to join two sessions that a
record bridges::

    >>> count = Count()
    >>> acc = count.add(count.add(count.initial(), "a"), "b")
    >>> count.result(b"k", Window(0, 1000), acc)
    WindowResult(key='k', start_ms=0, end_ms=1000, value=2)
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, Protocol, TypeAlias, TypeVar

import msgspec

A = TypeVar("A")
V = TypeVar("V")


class Window(NamedTuple):
    """The bounds of one window: ``start_ms <= event time < end_ms``."""

    start_ms: int
    end_ms: int


class WindowResult(msgspec.Struct, Generic[V], frozen=True):
    """What the built-in aggregates emit: one value per key and window.

    ``key`` is the state key, as text when it was bytes (a Kafka key).
    """

    key: Any
    start_ms: int
    end_ms: int
    value: V


def key_text(key: Any) -> Any:
    """A state key for a result: bytes (a Kafka key) as text, anything else as it is."""
    if isinstance(key, bytes):
        return key.decode("utf-8", "backslashreplace")
    return key


@dataclass(frozen=True)
class Tumbling:
    """Back-to-back windows of ``size_ms``: each record is in exactly one."""

    size_ms: int

    def windows_of(self, t: int) -> list[Window]:
        start = t - t % self.size_ms
        return [Window(start, start + self.size_ms)]


@dataclass(frozen=True)
class Hopping:
    """Windows of ``size_ms`` starting every ``step_ms``: a record is in ``size/step`` of them.

    ``size_ms`` must be a multiple of ``step_ms``.
    """

    size_ms: int
    step_ms: int

    def windows_of(self, t: int) -> list[Window]:
        size, step = self.size_ms, self.step_ms
        last = t - t % step
        return [Window(start, start + size) for start in range(last - size + step, last + 1, step)]


@dataclass(frozen=True)
class Session:
    """Per key, records less than ``gap_ms`` apart form one window.

    A session spans from its first record to ``gap_ms`` after its last; it
    closes once event time passes that end (plus the grace). A record that
    falls within the gap of two sessions joins them (``aggregate.merge``).
    """

    gap_ms: int


WindowSpec: TypeAlias = Tumbling | Hopping | Session


class Aggregate(Protocol[A]):
    """What :class:`~loom.streaming.WindowAggregate` folds records with."""

    def initial(self) -> A: ...

    def add(self, acc: A, value: Any) -> A: ...

    def result(self, key: Any, window: Window, acc: A) -> Any: ...


Field: TypeAlias = str | Callable[[Any], Any]


def field_reader(field: Field) -> Callable[[Any], Any]:
    """``field`` as a function of the payload: a callable, a mapping key or an attribute."""
    if callable(field):
        return field
    item, attribute = operator.itemgetter(field), operator.attrgetter(field)

    def read(value: Any) -> Any:
        return item(value) if isinstance(value, dict) else attribute(value)

    return read


class Count:
    """The number of records in the window."""

    def __repr__(self) -> str:
        return "Count()"

    def initial(self) -> int:
        return 0

    def add(self, acc: int, value: Any) -> int:
        return acc + 1

    def merge(self, a: int, b: int) -> int:
        return a + b

    def result(self, key: Any, window: Window, acc: int) -> WindowResult[int]:
        return WindowResult(key_text(key), window.start_ms, window.end_ms, acc)


class _FieldAggregate:
    """An aggregate over one numeric field (a key, attribute or function of the payload)."""

    def __init__(self, field: Field) -> None:
        self.field = field
        self.read = field_reader(field)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.field!r})"


class Sum(_FieldAggregate):
    """The sum of ``field`` over the window's records."""

    def initial(self) -> Any:
        return 0

    def add(self, acc: Any, value: Any) -> Any:
        return acc + self.read(value)

    def merge(self, a: Any, b: Any) -> Any:
        return a + b

    def result(self, key: Any, window: Window, acc: Any) -> WindowResult[Any]:
        return WindowResult(key_text(key), window.start_ms, window.end_ms, acc)


class Min(_FieldAggregate):
    """The smallest ``field`` of the window's records."""

    def initial(self) -> Any:
        return None

    def add(self, acc: Any, value: Any) -> Any:
        x = self.read(value)
        return x if acc is None or x < acc else acc

    def merge(self, a: Any, b: Any) -> Any:
        return b if a is None or (b is not None and b < a) else a

    def result(self, key: Any, window: Window, acc: Any) -> WindowResult[Any]:
        return WindowResult(key_text(key), window.start_ms, window.end_ms, acc)


class Max(_FieldAggregate):
    """The largest ``field`` of the window's records."""

    def initial(self) -> Any:
        return None

    def add(self, acc: Any, value: Any) -> Any:
        x = self.read(value)
        return x if acc is None or x > acc else acc

    def merge(self, a: Any, b: Any) -> Any:
        return b if a is None or (b is not None and b > a) else a

    def result(self, key: Any, window: Window, acc: Any) -> WindowResult[Any]:
        return WindowResult(key_text(key), window.start_ms, window.end_ms, acc)


class Mean(_FieldAggregate):
    """The arithmetic mean of ``field`` over the window's records."""

    def initial(self) -> tuple[float, int]:
        return (0, 0)

    def add(self, acc: tuple[float, int], value: Any) -> tuple[float, int]:
        return (acc[0] + self.read(value), acc[1] + 1)

    def merge(self, a: tuple[float, int], b: tuple[float, int]) -> tuple[float, int]:
        return (a[0] + b[0], a[1] + b[1])

    def result(self, key: Any, window: Window, acc: tuple[float, int]) -> WindowResult[float]:
        total, count = acc
        return WindowResult(key_text(key), window.start_ms, window.end_ms, total / count)


class Collect:
    """The window's first ``max_items`` payloads, in arrival order.

    The bound keeps one hot key from growing a window without limit; a
    window with more records keeps the first ``max_items``.
    """

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items

    def __repr__(self) -> str:
        return f"Collect({self.max_items})"

    def initial(self) -> list[Any]:
        return []

    def add(self, acc: list[Any], value: Any) -> list[Any]:
        if len(acc) < self.max_items:
            acc.append(value)
        return acc

    def merge(self, a: list[Any], b: list[Any]) -> list[Any]:
        return (a + b)[: self.max_items]

    def result(self, key: Any, window: Window, acc: list[Any]) -> WindowResult[list[Any]]:
        return WindowResult(key_text(key), window.start_ms, window.end_ms, acc)
