"""The delivery layer: what the Bytewax adapter and the transports share.

Neutral ground below both: completion tracking (:mod:`.acks`) and the
transport contract (:mod:`.transport`: input records as a transport delivers
them, encoded output records, readers, writers and the report of a record
the broker refused). It imports nothing else of Loom, so a transport
(``loom.transports.kafka``, the in-memory one of ``loom.streaming.testing``)
depends on this package alone, never on the adapter.
"""
