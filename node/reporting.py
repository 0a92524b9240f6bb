"""The errors topic: one message per rejected input or failed step, rate-limited per source.

Every report is counted (telemetry `errors`); publication is limited per (sensor, kind) with a
token bucket so a broken sensor cannot flood the broker. Reports folded by the limit are counted
in the next published report's `suppressed` field, so nothing disappears without a trace.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from node.metrics import NodeMetrics
from schemas import topics
from schemas.codec import encode
from schemas.messages import ErrorKind, ErrorReport

logger = logging.getLogger(__name__)

Publisher = Callable[[str, bytes], bool]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    suppressed: int = 0


class ErrorReporter:
    """Counts, logs and publishes error reports for one node."""

    def __init__(
        self, node_id: str, publish: Publisher, metrics: NodeMetrics, *, per_second: float = 5.0
    ) -> None:
        self._node_id = node_id
        self._topic = topics.node_errors(node_id)
        self._publish = publish
        self._metrics = metrics
        self._rate = per_second
        self._burst = max(per_second, 1.0)
        self._buckets: dict[tuple[str | None, ErrorKind], _Bucket] = {}
        self._lock = threading.Lock()

    def report(
        self,
        kind: ErrorKind,
        reason: str,
        *,
        topic: str | None = None,
        sensor_id: str | None = None,
        seq: int | None = None,
    ) -> bool:
        """Count and (rate permitting) publish one report; True when it was published."""
        self._metrics.error(kind)
        logger.debug("%s from %s: %s", kind, topic or "node", reason)
        suppressed = self._take_token((sensor_id, kind))
        if suppressed is None:
            return False
        report = ErrorReport(
            node_id=self._node_id,
            ts=time.time(),
            kind=kind,
            reason=reason,
            topic=topic,
            sensor_id=sensor_id,
            seq=seq,
            suppressed=suppressed,
        )
        return self._publish(self._topic, encode(report))

    def _take_token(self, key: tuple[str | None, ErrorKind]) -> int | None:
        """Suppressed count to attach when a token is available, else None (and count it)."""
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(tokens=self._burst, updated=now)
            bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
            if bucket.tokens < 1:
                bucket.suppressed += 1
                return None
            bucket.tokens -= 1
            suppressed, bucket.suppressed = bucket.suppressed, 0
            return suppressed
