"""Picking up after an earlier run of the same node: what it spooled and what it had in flight.

Results an earlier process spooled or journaled (node/mqtt/spool.py, journal.py) name windows
that were served; the broker re-sends those windows (that process never acknowledged them), so
they are marked as seen and skipped instead of run twice. Results the journal still held in
flight are published again (to the spool until the broker is back).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import orjson

from node.mqtt.outbox import Outbox
from schemas import topics

logger = logging.getLogger(__name__)

Seen = Callable[[str, int], None]
"""(sensor id, seq): a window that an earlier run served."""


def resume(outbox: Outbox, seen: Seen) -> None:
    """Mark what an earlier run spooled or journaled as served; republish its journaled results."""
    _seed_from_spool(outbox, seen)
    journal = outbox.journal
    if journal is None:
        return
    left = journal.leftovers()
    for topic, payload in left.settled:
        mark_served(topic, payload, seen)
    for topic, payload in left.in_flight:
        mark_served(topic, payload, seen)
        outbox.publish(topic, payload)


def mark_served(topic: str, payload: bytes, seen: Seen) -> bool:
    """If `payload` is a result on `topic`, mark its window as served; True if it was."""
    parsed = topics.parse_sensor_topic(topic)
    if parsed is None or not topic.endswith("/motifs"):
        return False
    try:
        seq = orjson.loads(payload).get("seq")
    except orjson.JSONDecodeError:
        return False
    if not isinstance(seq, int):
        return False
    seen(parsed.sensor_id, seq)
    return True


def _seed_from_spool(outbox: Outbox, seen: Seen) -> None:
    spool = outbox.spool
    if spool is None or not spool.stats().messages:
        return
    seeded = 0
    for segment in spool.seal():
        for topic, payload in spool.read(segment):
            seeded += mark_served(topic, payload, seen)
    logger.info("%d spooled results from an earlier run mark their windows as served", seeded)
