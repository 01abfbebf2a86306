"""Every exception Loom defines, in one tree under :class:`LoomError`.

``except LoomError`` catches anything Loom itself raises; the branches tell
*when* it can happen and what to do about it::

    LoomError
    ├── ConfigurationError            fix the declaration or the config, start again
    │   ├── SettingsError             (ValueError) invalid LOOM_* variables / config file
    │   │   └── ConfigPathError           refused below the settings layer, by config path
    │   │       └── StateLayoutError          the state directory holds another number
    │   │                                     of workers' state
    │   ├── MissingVariableError      (KeyError) the config file names an unset ${VAR}
    │   └── FlowValidationError       (ValueError) the flow declaration cannot run
    ├── StartupError                  (RuntimeError) the service cannot start *here*
    │   ├── KafkaStartupError         the cluster: unreachable, topics missing, ...
    │   └── DevBrokerError            the development broker could not start
    ├── ClusterPeerLostError          (RuntimeError) a cluster process is gone: restart all
    ├── RecordError                   one record failed: it becomes a dead letter,
    │   │                             the flow goes on (never raised to the caller)
    │   ├── DecodeError               (ValueError) WIRE: bytes not a valid payload
    │   ├── BusinessError             BUSINESS: a step refused the record (user-raised)
    │   ├── AsyncTimeout              TIMEOUT: an async step exceeded its timeout_ms
    │   ├── KeySpansPartitions        TASK: a stateful node's key function put one key
    │   │                             in two input partitions
    │   └── MessageTooLarge           DELIVERY: the TestRunner's memory broker refused it
    ├── DlqError                      loom dlq / loom.dlq: a dead-letter topic could not
    │                                 be read or replayed (broker, topic, delivery)
    ├── GracefulStop                  internal (loom.streaming.bytewax): ends a
    │                                 recovery-enabled run; never escapes ``run()``
    └── _StoppedBeforeStart           internal (runner): a stop before any worker
                                      started; never escapes ``run()``

The builtin bases in parentheses stay for callers that catch those (a
``SettingsError`` is still a ``ValueError``). A record-level error's class
name is the ``exception_type`` of its dead-letter envelope.

The classes are defined here and re-exported where they were first defined
(``loom.config.settings.SettingsError``, ``loom.streaming.BusinessError``,
...), so either import works. This module imports nothing else of Loom, so
any module can import it.
"""

from __future__ import annotations

from collections.abc import Sequence


class LoomError(Exception):
    """Base of every exception Loom defines."""


# -- configuration -------------------------------------------------------------


class ConfigurationError(LoomError):
    """The flow declaration or the service's configuration is wrong.

    Nothing in the environment can fix it: correct the code or the settings
    and start again.
    """


class SettingsError(ConfigurationError, ValueError):
    """Invalid settings; ``problems`` has one line per bad variable."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


ConfigPath = tuple[str, ...]
"""A place in the configuration, e.g. ``("kafka", "group_id")``."""


class ConfigPathError(SettingsError):
    """Settings refused by a component below the settings layer (a transport).

    Such a component knows config paths, not where a value came from (a
    variable, a file, a dict): ``located`` pairs the paths at fault with what
    is wrong, and the settings layer names the variables
    (``loom.config.settings.describe``). ``problems`` reads with the paths.
    """

    def __init__(self, located: Sequence[tuple[Sequence[ConfigPath], str]]) -> None:
        self.located = tuple((tuple(paths), message) for paths, message in located)
        super().__init__(
            [
                f"{', '.join('.'.join(path) for path in paths)}: {message}"
                for paths, message in self.located
            ]
        )


class StateLayoutError(ConfigPathError):
    """The state directory holds snapshots of another number of workers.

    State is partitioned across workers; reading part of it would lose keys.
    Run with the number of workers that wrote it, or empty the directory.
    """


class MissingVariableError(ConfigurationError, KeyError):
    """A ``${VAR}`` without default names an unset environment variable."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return (
            f"environment variable {self.name} is referenced by the config file "
            "but not set (use ${" + self.name + ":-default} for an optional one)"
        )


class FlowValidationError(ConfigurationError, ValueError):
    """A flow declaration cannot run; ``problems`` lists every reason at once."""

    def __init__(self, flow_name: str, problems: Sequence[str]) -> None:
        self.flow_name = flow_name
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"flow {flow_name!r} is invalid ({count} {noun}):\n{lines}")


# -- start-up ------------------------------------------------------------------


class StartupError(LoomError, RuntimeError):
    """The service cannot start here; the message says why, in one line."""


class KafkaStartupError(StartupError):
    """The flow cannot start against this cluster; the message says why."""


class DevBrokerError(StartupError):
    """The development broker could not start."""


# -- run time ------------------------------------------------------------------


class DlqError(LoomError):
    """A dead-letter topic could not be read or replayed (``loom dlq``); the message says why."""


class ClusterPeerLostError(LoomError, RuntimeError):
    """A process of a multi-process Bytewax cluster stopped or became unreachable.

    A Bytewax cluster cannot continue with fewer processes than it started
    with: every process stops (exit code 3 for a service) and the whole
    cluster must be restarted. Committed offsets only cover finished
    records, so the restart loses nothing.
    """


# -- record level --------------------------------------------------------------


class RecordError(LoomError):
    """One record failed; Loom routes it to the flow's error terminals.

    These are caught per record and written as dead letters (the class name
    is the envelope's ``exception_type``); the flow carries on with the
    next record, so a caller of ``run()`` never sees one.
    """


class DecodeError(RecordError, ValueError):
    """The bytes are not a valid encoding of the payload type (``WIRE``).

    Every codec raises it, whatever the payload library (msgspec, pydantic)
    and whether the bytes are malformed or the shape is invalid; the message
    is the library's.
    """


class BusinessError(RecordError):
    """Raise from a step to reject a record for a domain reason.

    Routed as ``ErrorKind.BUSINESS`` instead of ``TASK``, so expected
    refusals ("unknown customer") are told apart from bugs.

    It is a :class:`LoomError` although user code raises it: it is part of
    Loom's contract, a signal *to* the runtime (like :class:`DecodeError`,
    it ends one record's path, never the flow), and Loom catches it for
    every step. Subclassing it for a team's own refusals is fine.
    """


class KeySpansPartitions(RecordError, ValueError):
    """A stateful node's key has state for another input partition (``TASK``).

    State is kept per input partition, so a ``key=`` function must keep each
    key in one partition; records it would group across partitions are
    dead-lettered instead of splitting the key's state (``docs/stateful.md``).
    """


class AsyncTimeout(RecordError):
    """An async step ran longer than its ``timeout_ms`` (``TIMEOUT``).

    ``stack`` is where the call was waiting when it was cancelled (the
    exception itself is raised by Loom, outside the step's code).
    """

    def __init__(self, message: str, stack: str | None = None) -> None:
        super().__init__(message)
        self.stack = stack


class MessageTooLarge(RecordError):
    """The TestRunner's memory broker refuses a value above its ``max_message_bytes``."""
