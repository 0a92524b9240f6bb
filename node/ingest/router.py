"""Sensor messages -> validated windows on the bounded inference queue.

Runs on the MQTT network thread, so it only decodes, validates, windows and enqueues (about 0.1 ms
per JSON window). Every rejection goes to the errors topic with its reason and the node keeps
serving; a full queue drops the newest window and says so.

After a reconnect the broker re-sends, with the DUP flag, QoS 1 messages whose acknowledgement it
never got. A redelivered window (or sample run) whose seq this node has already taken is skipped
and counted (telemetry `redelivered`), so a broker restart runs no window twice. Binary frames
carry no seq and cannot be told apart: a re-sent one is served again.
"""

from __future__ import annotations

import logging
import queue
import time

import paho.mqtt.client as mqtt

from node.inference.worker import WorkItem
from node.ingest.windower import Discontinuity, SampleWindower
from node.metrics import NodeMetrics
from node.reporting import ErrorReporter
from schemas.codec import InputRejectedError, decode_any_window, decode_samples
from schemas.messages import ErrorKind
from schemas.topics import is_valid_id, parse_sensor_topic

logger = logging.getLogger(__name__)


class Ingest:
    """Handlers for `imu/+/window` and `imu/+/samples`."""

    def __init__(
        self,
        work: queue.Queue[WorkItem],
        windower: SampleWindower,
        reporter: ErrorReporter,
        metrics: NodeMetrics,
    ) -> None:
        self._queue = work
        self._windower = windower
        self._reporter = reporter
        self._metrics = metrics
        self._last_window_seq: dict[str, int] = {}
        self._closed = False

    def close(self) -> None:
        """Refuse (and count) anything that still arrives while the node shuts down."""
        self._closed = True

    def on_window(self, message: mqtt.MQTTMessage) -> None:
        """Handle one `imu/{sensor_id}/window` message."""
        received = time.perf_counter_ns()
        sensor_id = self._sensor_id(message)
        if sensor_id is None:
            return
        payload = bytes(message.payload)
        try:
            window = decode_any_window(payload, _content_type(message))
        except InputRejectedError as exc:
            self._reject(exc, message.topic, sensor_id)
            return
        if window.seq is not None:
            last = self._last_window_seq.get(sensor_id)
            if message.dup and last is not None and window.seq <= last:
                self._metrics.window_redelivered()
                return
            self._check_window_seq(sensor_id, window.seq, message.topic)
        self._enqueue(WorkItem(sensor_id, window.seq, window.t0, None, window.x, received))

    def on_samples(self, message: mqtt.MQTTMessage) -> None:
        """Handle one `imu/{sensor_id}/samples` message."""
        received = time.perf_counter_ns()
        sensor_id = self._sensor_id(message)
        if sensor_id is None:
            return
        try:
            run = decode_samples(bytes(message.payload))
        except InputRejectedError as exc:
            self._reject(exc, message.topic, sensor_id)
            return
        if message.dup and self._windower.has_taken(sensor_id, run.seq, len(run.samples)):
            self._metrics.window_redelivered()
            return
        windows, event = self._windower.add(sensor_id, run.samples, run.seq, run.t0, run.rate_hz)
        if event is not None:
            if event.kind is Discontinuity.GAP:
                kind = ErrorKind.SEQUENCE_GAP
                reason = (
                    f"{event.got - event.expected} samples missing (expected seq {event.expected}, "
                    f"got {event.got}); windowing restarted at {event.got}"
                )
            else:
                kind = ErrorKind.SEQUENCE_RESET
                reason = (
                    f"sample seq went back from {event.expected} to {event.got} (sensor restart or "
                    "duplicate); windowing restarted"
                )
            self._reporter.report(
                kind, reason, topic=message.topic, sensor_id=sensor_id, seq=run.seq
            )
        for cut in windows:
            self._enqueue(WorkItem(sensor_id, cut.seq, cut.t0, cut.t1, cut.x, received))

    def _sensor_id(self, message: mqtt.MQTTMessage) -> str | None:
        parsed = parse_sensor_topic(message.topic)
        if parsed is None or not is_valid_id(parsed.sensor_id):
            self._reporter.report(
                ErrorKind.BAD_TOPIC,
                "sensor id must be 1-64 of letters, digits, '_', '.', ':', '-' "
                "(topic imu/{sensor_id}/window or imu/{sensor_id}/samples)",
                topic=message.topic,
            )
            return None
        return parsed.sensor_id

    def _check_window_seq(self, sensor_id: str, seq: int, topic: str) -> None:
        last = self._last_window_seq.get(sensor_id)
        self._last_window_seq[sensor_id] = seq
        if last is None or seq == last + 1:
            return
        if seq > last + 1:
            self._reporter.report(
                ErrorKind.SEQUENCE_GAP,
                f"{seq - last - 1} windows missing between seq {last} and {seq}",
                topic=topic,
                sensor_id=sensor_id,
                seq=seq,
            )
        else:
            self._reporter.report(
                ErrorKind.SEQUENCE_RESET,
                f"window seq went back from {last} to {seq} (sensor restart or duplicate)",
                topic=topic,
                sensor_id=sensor_id,
                seq=seq,
            )

    def _reject(self, exc: InputRejectedError, topic: str, sensor_id: str) -> None:
        self._reporter.report(exc.kind, exc.reason, topic=topic, sensor_id=sensor_id)

    def _enqueue(self, item: WorkItem) -> None:
        if self._closed:
            self._metrics.window_dropped("shutting_down")
            self._reporter.report(
                ErrorKind.SHUTTING_DOWN,
                "node is shutting down: window arrived after unsubscribe and was not served",
                sensor_id=item.sensor_id,
                seq=item.seq,
            )
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._metrics.window_dropped("queue_full")
            self._reporter.report(
                ErrorKind.QUEUE_FULL,
                f"node over capacity: window dropped (queue of {self._queue.maxsize} full). "
                "Lower the input rate, raise queue_size, or add nodes with a share group",
                topic=None,
                sensor_id=item.sensor_id,
                seq=item.seq,
            )
            return
        self._metrics.window_accepted()


def _content_type(message: mqtt.MQTTMessage) -> str | None:
    properties = getattr(message, "properties", None)
    value = getattr(properties, "ContentType", None) if properties is not None else None
    return value if isinstance(value, str) else None
