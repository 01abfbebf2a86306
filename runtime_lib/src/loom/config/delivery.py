"""The delivery guarantee: how input offsets are committed, decided in one place.

Two guarantees exist:

``at-least-once``
    Loom tracks every record derived from an input offset and commits the
    offset only once all of them reached a terminal state (delivered to an
    output or dead-letter topic, or deliberately dropped). librdkafka's
    auto-commit is switched off.

``at-most-once``
    librdkafka auto-commits consumed positions on its own schedule, whether
    or not the records were processed: a crash loses the records in flight.

Which one applies is decided by :func:`resolve`, and only there:

1. ``kafka.delivery_guarantee`` (``LOOM_KAFKA__DELIVERY_GUARANTEE``) when set.
   A service run by :func:`loom.service.serve` (settings from the
   environment) always has it: the settings layer defaults it to
   ``at-least-once``.
2. Otherwise, as the runner API documents for ``StreamingRunner.from_dict``
   and ``from_yaml``: ``enable.auto.commit`` of ``kafka.consumer``, which is
   librdkafka's ``true`` (at-most-once) unless set to ``false``.

An ``enable.auto.commit`` that contradicts an explicit guarantee is a
settings error (see :class:`loom.config.context.KafkaSettings`), never a
silent override either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

DeliveryGuarantee = Literal["at-least-once", "at-most-once"]
AT_LEAST_ONCE: DeliveryGuarantee = "at-least-once"
AT_MOST_ONCE: DeliveryGuarantee = "at-most-once"
GUARANTEE_VARIABLE = "LOOM_KAFKA__DELIVERY_GUARANTEE"


class Delivery(NamedTuple):
    """The guarantee in force and what decided it (for the start-up log line)."""

    guarantee: DeliveryGuarantee
    reason: str

    @property
    def auto_commit(self) -> bool:
        """Whether librdkafka commits offsets itself (``enable.auto.commit``)."""
        return self.guarantee == AT_MOST_ONCE


def auto_commit_setting(consumer: Mapping[str, Any]) -> bool | None:
    """``enable.auto.commit`` of librdkafka consumer settings, if present."""
    if "enable.auto.commit" not in consumer:
        return None
    return str(consumer["enable.auto.commit"]).strip().lower() not in ("false", "0", "no", "off")


def implied_guarantee(auto_commit: bool) -> DeliveryGuarantee:
    return AT_MOST_ONCE if auto_commit else AT_LEAST_ONCE


def resolve(explicit: DeliveryGuarantee | None, consumer: Mapping[str, Any]) -> Delivery:
    """The guarantee for an explicit setting (or none) and the consumer settings."""
    if explicit is not None:
        return Delivery(explicit, f"kafka.delivery_guarantee ({GUARANTEE_VARIABLE})")
    auto_commit = auto_commit_setting(consumer)
    if auto_commit is None:
        return Delivery(
            AT_MOST_ONCE,
            "neither kafka.delivery_guarantee nor enable.auto.commit is set, so "
            "librdkafka auto-commits (the runner API's default)",
        )
    return Delivery(implied_guarantee(auto_commit), "enable.auto.commit of kafka.consumer")


def conflict(explicit: DeliveryGuarantee, consumer: Mapping[str, Any]) -> str | None:
    """Why ``consumer`` contradicts the explicit guarantee, or ``None``."""
    auto_commit = auto_commit_setting(consumer)
    if auto_commit is None or implied_guarantee(auto_commit) == explicit:
        return None
    return (
        f"enable.auto.commit={str(auto_commit).lower()} contradicts the delivery guarantee "
        f"{explicit!r}: remove enable.auto.commit, the commit mode is chosen by "
        f"{GUARANTEE_VARIABLE} (kafka.delivery_guarantee): at-least-once (the default) "
        "or at-most-once"
    )
