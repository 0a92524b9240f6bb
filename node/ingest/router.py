"""Sensor messages -> validated windows on the bounded inference queue.

Runs on the MQTT network thread, so it only decodes, validates, windows and enqueues (about 0.1 ms
per JSON window). Every rejection goes to the errors topic with its reason and the node keeps
serving; a full queue drops the newest window and says so.

Each message's acknowledgement (PUBACK) is held until its windows are safely done
(node/ingest/acks.py): a node that crashes leaves them with the broker, which delivers them again
to the restarted node. After a reconnect or a restart the broker re-sends, with the DUP flag,
QoS 1 messages whose acknowledgement it never got. A redelivered window (or sample run) whose seq
this node has already taken is skipped and counted (telemetry `redelivered`), so it does not run
twice; it is acknowledged with (or, when done, right after) the original. A binary frame carries
its seq in its header, or in the MQTT 5 user property `seq` (docs/topics.md, Binary frames); one
without either cannot be told apart, and a re-sent one is served again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

import orjson
import paho.mqtt.client as mqtt
from pydantic import ValidationError

from common.mqtt.client import Ack, no_ack
from node.ingest.acks import AckLedger
from node.ingest.share import Reassigned, SensorShare
from node.ingest.windower import Discontinuity, SampleWindower
from node.metrics import NodeMetrics
from node.reporting import ErrorReporter
from node.work import WorkItem
from schemas.codec import (
    DecodedSamples,
    InputRejectedError,
    decode_any_window,
    decode_samples,
)
from schemas.messages import ErrorKind, NodeStatus
from schemas.topics import is_valid_id, parse_sensor_topic

logger = logging.getLogger(__name__)

MAX_RESULT_BYTES = 64 * 1024
"""Results read for where a sensor's windows have got to (about 1.1 KB each)."""
FULL_WAIT_S = 1.0
"""How long a window waits for room in a full queue before it is dropped (and reported)."""
SHARE_KEEP_SAMPLES = 1000
"""Share group: samples a node keeps from before each sensor's next window (10 s at 100 Hz), to
serve the windows a member that went away left without a result."""


class Ingest:
    """Handlers for `imu/+/window` and `imu/+/samples`."""

    def __init__(
        self,
        work: queue.Queue[WorkItem],
        windower: SampleWindower,
        reporter: ErrorReporter,
        metrics: NodeMetrics,
        *,
        ack_later: Callable[[mqtt.MQTTMessage], Ack] | None = None,
        full_wait_s: float = FULL_WAIT_S,
        share: SensorShare | None = None,
    ) -> None:
        self._queue = work
        self._windower = windower
        self._reporter = reporter
        self._metrics = metrics
        self._ack_later = ack_later or (lambda _message: no_ack)
        self._full_wait_s = full_wait_s
        self.acks = AckLedger()
        self._last_window_seq: dict[str, int] = {}
        self._taken: dict[str, _Recent] = {}
        self._closed = False
        self.share = share
        self._share_lock = threading.Lock()
        """Share groups decide owners in the order messages came: samples, statuses and results
        one at a time."""

    def seen(self, sensor_id: str, seq: int) -> None:
        """Window `seq` of `sensor_id` was served by an earlier run (its result is spooled):
        a re-sent copy is skipped, not run twice."""
        self._taken.setdefault(sensor_id, _Recent()).add(seq)

    def close(self) -> None:
        """Refuse (and count) anything that still arrives while the node shuts down."""
        self._closed = True

    def on_window(self, message: mqtt.MQTTMessage) -> None:
        """Handle one `imu/{sensor_id}/window` message."""
        received = time.perf_counter_ns()
        ack = self._ack_later(message)
        sensor_id = self._sensor_id(message)
        if sensor_id is None or self._retained(message, sensor_id):
            ack()  # reported: acknowledged, or the broker would send it again forever
            return
        payload = bytes(message.payload)
        try:
            window = decode_any_window(payload, _content_type(message), user_seq=_user_seq(message))
        except InputRejectedError as exc:
            self._reject(exc, message.topic, sensor_id)
            ack()
            return
        seq = window.seq  # the window's own, else the user property's (they may not differ)
        if seq is not None:
            if message.dup and seq in self._taken.get(sensor_id, ()):  # a copy of one taken
                self._metrics.window_redelivered()
                self.acks.duplicate_window(sensor_id, seq, ack)
                return
            self._check_window_seq(sensor_id, seq, message.topic)
            self._taken.setdefault(sensor_id, _Recent()).add(seq)
        done = self.acks.window(sensor_id, seq, ack)
        self._enqueue(WorkItem(sensor_id, seq, window.t0, None, window.x, received, done=done))

    def on_samples(self, message: mqtt.MQTTMessage) -> None:
        """Handle one `imu/{sensor_id}/samples` message."""
        received = time.perf_counter_ns()
        ack = self._ack_later(message)
        sensor_id = self._sensor_id(message)
        if sensor_id is None or self._retained(message, sensor_id):
            ack()
            return
        try:
            run = decode_samples(bytes(message.payload))
        except InputRejectedError as exc:
            self._reject(exc, message.topic, sensor_id)
            ack()
            return
        share = self.share
        if share is None:
            self._take_run(message, sensor_id, run, ack, received, cut=True)
            return
        with self._share_lock:  # the windows' owners are decided in the order messages came
            share.seen(sensor_id, run.seq)
            self._take_run(
                message,
                sensor_id,
                run,
                ack,
                received,
                cut=lambda start: share.cut(sensor_id, start),
            )

    def _take_run(
        self,
        message: mqtt.MQTTMessage,
        sensor_id: str,
        run: DecodedSamples,
        ack: Ack,
        received: int,
        *,
        cut: bool | Callable[[int], bool],
    ) -> None:
        """Window a decoded run; queue the windows it completes that this node serves."""
        end = run.seq + len(run.samples)
        if message.dup and self._windower.has_taken(sensor_id, run.seq, len(run.samples)):
            self._metrics.window_redelivered()
            self.acks.samples(sensor_id, end, ack, restarted=False)
            self.acks.release(sensor_id)
            return
        windows, event = self._windower.add(
            sensor_id, run.samples, run.seq, run.t0, run.rate_hz, cut=cut
        )
        self.acks.samples(sensor_id, end, ack, restarted=event is not None)
        if event is not None and event.kind is Discontinuity.RESET and self.share is not None:
            self.share.restarted(sensor_id)
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
        for window in windows:
            done = self.acks.cut(sensor_id, window.seq)
            self._enqueue(
                WorkItem(sensor_id, window.seq, window.t0, window.t1, window.x, received, done=done)
            )
        self.acks.release(sensor_id)

    # -- share groups (node/ingest/share.py) -------------------------------------------------

    def on_member_status(self, node_id: str, payload: bytes) -> None:
        """A retained status of a node (possibly this one) arrived: the group may have changed."""
        if self.share is None:
            return
        status = None
        if payload:
            try:
                status = NodeStatus.model_validate_json(payload)
            except ValidationError:
                logger.warning("ignoring an invalid status of node %s", node_id)
                return
            if status.node_id != node_id:
                return  # a status must come from its own topic (the ACL lets a node write only it)
        with self._share_lock:
            for note in self.share.status(node_id, status):
                if isinstance(note, Reassigned):
                    self._serve_reassigned(note)
                else:
                    self._reporter.report(ErrorKind.SHARE_GROUP, note.reason)

    def on_result(self, message: mqtt.MQTTMessage) -> None:
        """A result on `imu/{sensor_id}/motifs`: where a sensor's served windows have got to."""
        if self.share is None or message.retain:  # a retained result is nobody's live one
            return
        parsed = parse_sensor_topic(message.topic)
        if parsed is None or len(message.payload) > MAX_RESULT_BYTES:
            return
        try:
            body = orjson.loads(message.payload)
            seq, node_id = body.get("seq"), body.get("node_id")
        except (orjson.JSONDecodeError, AttributeError):
            return
        if isinstance(seq, int) and not isinstance(seq, bool) and isinstance(node_id, str):
            with self._share_lock:
                self.share.result(parsed.sensor_id, seq, node_id)

    @property
    def share_leaving(self) -> bool:
        """True once this node's own `stopping` status came back: it cuts no new window."""
        return self.share is not None and self.share.leaving

    def _serve_reassigned(self, reassigned: Reassigned) -> None:
        """Cut again, and serve, the windows a gone member left that are this node's now."""
        sensor_id, starts = reassigned.sensor_id, reassigned.starts
        missing = reassigned.lost
        if starts:
            recut = self._windower.recut(sensor_id, min(starts), max(starts) + 1)
            wanted = set(starts)
            windows = [w for w in recut.windows if w.seq in wanted]
            missing += len(wanted) - len(windows)
            logger.info(
                "serving %d windows of sensor %s that node %s left",
                len(windows),
                sensor_id,
                reassigned.gone,
            )
            received = time.perf_counter_ns()
            for window in windows:  # its samples were acknowledged: nothing to hold
                self._enqueue(
                    WorkItem(sensor_id, window.seq, window.t0, window.t1, window.x, received)
                )
        if missing:
            for _ in range(missing):
                self._metrics.window_dropped("share_group")
            self._reporter.report(
                ErrorKind.SHARE_GROUP,
                f"{missing} windows of sensor {sensor_id} that node {reassigned.gone} left were "
                "older than the samples this node keeps: not served",
                sensor_id=sensor_id,
            )

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

    def _retained(self, message: mqtt.MQTTMessage, sensor_id: str) -> bool:
        """A retained window or run is replayed to every node that subscribes later: ignored,
        counted and reported."""
        if not message.retain:
            return False
        self._metrics.window_dropped("retained")
        self._reporter.report(
            ErrorKind.RETAINED_INPUT,
            "a retained sensor message: every node subscribing later would serve it again, so "
            f"it is ignored; sensors publish without retain (clear it: mosquitto_pub -r -n -t "
            f"{message.topic})",
            topic=message.topic,
            sensor_id=sensor_id,
        )
        return True

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
        else:  # a new stream: its seqs repeat the old one's, which must not count as taken
            self._taken.pop(sensor_id, None)
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
        if self._closed:  # reported; not acknowledged (a clean stop ends the session)
            self._metrics.window_dropped("shutting_down")
            self._reporter.report(
                ErrorKind.SHUTTING_DOWN,
                "node is shutting down: window arrived after unsubscribe and was not served",
                sensor_id=item.sensor_id,
                seq=item.seq,
            )
            return
        try:
            # a full queue holds the network thread back (TCP back-pressure: the broker keeps
            # what the node has not taken) for a moment before anything is dropped
            self._queue.put(item, timeout=self._full_wait_s)
        except queue.Full:
            self._metrics.window_dropped("queue_full")
            self._reporter.report(
                ErrorKind.QUEUE_FULL,
                f"node over capacity: window dropped (queue of {self._queue.maxsize} full for "
                f"{self._full_wait_s:g} s). "
                "Lower the input rate, raise queue_size, or add nodes with a share group",
                topic=None,
                sensor_id=item.sensor_id,
                seq=item.seq,
            )
            if item.done is not None:
                item.done()  # dropped and reported: acknowledged, not left to come back
            return
        self._metrics.window_accepted()


class _Recent:
    """The window seqs a sensor's last `size` windows had (what a re-sent copy can repeat)."""

    def __init__(self, size: int = 8192) -> None:
        self._order: deque[int] = deque()
        self._seqs: set[int] = set()
        self._size = size

    def __contains__(self, seq: int) -> bool:
        return seq in self._seqs

    def add(self, seq: int) -> None:
        if seq in self._seqs:
            return
        self._order.append(seq)
        self._seqs.add(seq)
        if len(self._order) > self._size:
            self._seqs.discard(self._order.popleft())


def _user_seq(message: mqtt.MQTTMessage) -> int | None:
    """A binary frame's seq, from its MQTT 5 user property `seq` (a decimal integer)."""
    properties = getattr(message, "properties", None)
    for name, value in getattr(properties, "UserProperty", None) or []:
        if name == "seq" and value.isdigit() and len(value) <= 19:
            return int(value)
    return None


def _content_type(message: mqtt.MQTTMessage) -> str | None:
    properties = getattr(message, "properties", None)
    value = getattr(properties, "ContentType", None) if properties is not None else None
    return value if isinstance(value, str) else None


def node_ingest(
    member: tuple[str, str],
    hop: int,
    share_group: str | None,
    *,
    work: queue.Queue[WorkItem],
    reporter: ErrorReporter,
    metrics: NodeMetrics,
    ack_later: Callable[[mqtt.MQTTMessage], Ack],
) -> Ingest:
    """A node's ingest: windows every `hop` samples; in a share group (as `member`, the node id
    and instance), aligned to the group's grid and keeping samples to serve a lost member's."""
    keep = SHARE_KEEP_SAMPLES if share_group else 0
    windower = SampleWindower(hop, keep=keep, align=bool(share_group))
    share = None
    if share_group:
        share = SensorShare(
            *member,
            share_group,
            hop,
            remember=SHARE_KEEP_SAMPLES // hop + 4,
            stream_end=windower.end,
        )
    return Ingest(work, windower, reporter, metrics, ack_later=ack_later, share=share)
