"""Record MQTT traffic to a file and replay it, and read recorded windows as a calibration set.

A recording is JSON lines, gzip-compressed when the file name ends in `.gz`. The first line is
a header, then one line per message in arrival order:

    {"format": "imu-recording", "version": 1, "created_at": "2025-...Z", "broker": "mqtt://...",
     "topics": ["imu/+/window"]}
    {"t": 0.5123, "topic": "imu/s1/window", "payload": {"x": [[...]], "seq": 7}}
    {"t": 0.5311, "topic": "imu/s2/window", "payload_b64": "AAAg...", "content_type": "..."}

`t` is seconds since the recorder started. A payload that is a JSON object is stored as that
object (orjson re-serialises it on replay: same values, compact spacing); anything else (binary
float32 frames, JSON scalars, text, numbers orjson could not keep exactly) is stored base64 and
replayed byte for byte. `content_type` (MQTT 5) is kept when the publisher set it.

The recorder encodes each message as it arrives and hands the line to a writer thread through a
bounded queue, so a slow disk never stalls the MQTT connection; a message that finds the queue
full is counted in `dropped` and logged, never lost silently. Replay republishes every message
at QoS 1 at its recorded time divided by `rate`. `recording_windows` (and through it
`fleet.bundles.calibration.load_calibration`) turns the window messages into a calibration set.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, cast

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from numpy.typing import NDArray

from node.config import BrokerAddress
from node.errors import NodeError
from node.mqtt.session import MqttSession, SessionSettings
from schemas.codec import (
    InputRejectedError,
    decode_binary_window,
    decode_window,
    is_binary_window,
)
from schemas.limits import CHANNELS, WINDOW_LENGTH

logger = logging.getLogger(__name__)

FORMAT: Final = "imu-recording"
VERSION: Final = 1
QUEUE_SIZE: Final = 10_000
"""Messages the writer may fall behind by before the recorder drops (and counts) them."""
FLUSH_INTERVAL_S: Final = 1.0
PROGRESS_INTERVAL_S: Final = 1.0
CONNECT_TIMEOUT_S: Final = 10.0
ACK_TIMEOUT_S: Final = 10.0
MAX_IN_FLIGHT: Final = 1_000
"""Replay waits while this many publishes are unacknowledged (back-pressure, no drops)."""
PROTOCOLS: Final = ("5", "3.1.1")
_GZIP_MAGIC: Final = b"\x1f\x8b"
_DIGIT_CLASSES: Final = bytes(
    ord("0") if chr(c).isdigit() and c < 128 else ord(".") if chr(c) in ".eE" else ord(" ")
    for c in range(256)
)
_LONG_INTEGER: Final = b" " + b"0" * 19
"""A run of 19+ digits not inside a fraction or exponent, once `_DIGIT_CLASSES` is applied.

orjson reads integers beyond 64 bits as floats, so payloads holding one are kept as bytes (a
match inside a string only costs readability, never exactness)."""


class RecordingError(NodeError):
    """A file that is not a readable recording; the message says which file, line and why."""


# --- stats -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordStats:
    """What a recorder has written so far.

    `messages`, `bytes` (payload bytes), `windows` (messages on `*/window`), `samples` (messages
    on `*/samples`) and `topics` (messages per topic) count what is in the file; `dropped` counts
    messages lost because the writer fell behind; `reconnects` counts broker reconnections (with
    MQTT 3.1.1 messages published while disconnected never reach the recorder).
    """

    messages: int = 0
    bytes: int = 0
    windows: int = 0
    samples: int = 0
    topics: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    dropped: int = 0
    reconnects: int = 0

    def summary(self) -> str:
        """One progress line: `12.0 s  1234 messages (1000 windows, 234 samples)  3.4 MB ...`."""
        return (
            f"{self.elapsed:6.1f} s  {self.messages} messages ({self.windows} windows, "
            f"{self.samples} samples) on {len(self.topics)} topics  "
            f"{_size(self.bytes)}  {self.dropped} dropped"
            + (f"  {self.reconnects} reconnects" if self.reconnects else "")
        )


@dataclass(frozen=True, slots=True)
class ReplayStats:
    """What a replay has published so far.

    `messages` and `bytes` were handed to the MQTT client, `dropped` were refused by it (queue
    full), `unacknowledged` were still without a PUBACK when the replay ended, `loops` counts the
    completed passes over the file and `max_lag` is the furthest (seconds) any publish fell behind
    its schedule.
    """

    messages: int = 0
    bytes: int = 0
    loops: int = 0
    elapsed: float = 0.0
    dropped: int = 0
    unacknowledged: int = 0
    max_lag: float = 0.0

    def summary(self) -> str:
        """One progress line: `12.0 s  1234 messages  3.4 MB  1 pass done  max lag 1 ms ...`."""
        return (
            f"{self.elapsed:6.1f} s  {self.messages} messages  {_size(self.bytes)}  "
            f"{self.loops} pass{'es' if self.loops != 1 else ''} done  "
            f"max lag {self.max_lag * 1e3:.0f} ms  {self.dropped} dropped"
            + (f"  {self.unacknowledged} unacknowledged" if self.unacknowledged else "")
        )


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 1e6 else f"{count / 1e3:.1f} kB"


# --- the file format -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RecordingHeader:
    """The first line of a recording."""

    created_at: str
    broker: str
    topics: list[str]
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """One recorded message: payload bytes as they will be replayed."""

    t: float
    """Seconds since the recorder started."""
    topic: str
    payload: bytes
    content_type: str | None = None
    is_json: bool = False
    """True when the file holds the payload as a JSON object (re-serialised compactly)."""
    line: int = 0
    """Line number in the file (1 is the header)."""


def encode_header(header: RecordingHeader) -> bytes:
    """The header line (with its newline)."""
    return (
        orjson.dumps(
            {
                "format": FORMAT,
                "version": header.version,
                "created_at": header.created_at,
                "broker": header.broker,
                "topics": header.topics,
            }
        )
        + b"\n"
    )


def encode_message(t: float, topic: str, payload: bytes, content_type: str | None = None) -> bytes:
    """One message line (with its newline): a JSON object payload inline, anything else base64."""
    entry: dict[str, Any] = {"t": round(t, 6), "topic": topic}
    if content_type:
        entry["content_type"] = content_type
    document = _json_object(payload)
    if document is not None:
        try:
            return orjson.dumps({**entry, "payload": document}) + b"\n"
        except orjson.JSONEncodeError:  # nested deeper than orjson writes: keep the bytes
            pass
    entry["payload_b64"] = base64.b64encode(payload).decode("ascii")
    return orjson.dumps(entry) + b"\n"


def _json_object(payload: bytes) -> dict[str, Any] | None:
    """The payload as a JSON object when orjson can re-serialise it without changing a value."""
    if payload.lstrip()[:1] != b"{":
        return None
    if _LONG_INTEGER in payload.translate(_DIGIT_CLASSES):
        return None
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return document if isinstance(document, dict) else None


def open_recording(path: Path) -> IO[bytes]:
    """Open a recording (or any JSON-lines file) for reading, gunzipping when it is gzip."""
    with path.open("rb") as probe:
        compressed = probe.read(2) == _GZIP_MAGIC
    return cast(IO[bytes], gzip.open(path, "rb")) if compressed else path.open("rb")


def is_recording_header(document: object) -> bool:
    """True when a parsed first line is a recording header (of any version)."""
    return isinstance(document, dict) and document.get("format") == FORMAT


def read_header(path: Path) -> RecordingHeader:
    """The header of a recording; raises RecordingError when the file is not one."""
    with open_recording(path) as stream:
        return _parse_header(path, _first_line(path, stream))


def read_recording(path: Path) -> Iterator[RecordedMessage]:
    """The messages of a recording in file order, validating the header and every line.

    Raises RecordingError (with the line number) for a file that is not a recording or a line
    that is not a message. A file cut short by a killed recorder (a partial last line, or a gzip
    stream without its end) yields every complete message and logs a warning.
    """
    with open_recording(path) as stream:
        _parse_header(path, _first_line(path, stream))
        number = 1
        try:
            for raw in stream:
                number += 1
                if not raw.strip():
                    continue
                if not raw.endswith(b"\n") and not _parses(raw):
                    logger.warning(
                        "%s:%d: partial last line (the recorder was stopped mid-write); "
                        "ignoring it",
                        path,
                        number,
                    )
                    return
                yield _parse_message(path, number, raw)
        except EOFError:
            logger.warning(
                "%s ends early after line %d (gzip stream not closed: the recorder was "
                "killed); later messages are lost",
                path,
                number,
            )


def _parses(raw: bytes) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


def _first_line(path: Path, stream: IO[bytes]) -> bytes:
    try:
        line = stream.readline()
    except (EOFError, gzip.BadGzipFile) as exc:
        msg = f"{path} is not an imu recording: cannot read it ({exc})"
        raise RecordingError(msg) from exc
    if not line.strip():
        msg = f"{path} is not an imu recording: it is empty (a recording starts with a header line)"
        raise RecordingError(msg)
    return line


def _parse_header(path: Path, line: bytes) -> RecordingHeader:
    expected = f'{{"format": "{FORMAT}", "version": {VERSION}, ...}}'
    try:
        document = orjson.loads(line)
    except orjson.JSONDecodeError:
        document = None
    if not is_recording_header(document):
        snippet = line[:60].decode("utf-8", "replace").rstrip()
        msg = (
            f"{path} is not an imu recording: its first line should be a header like "
            f"{expected}, found {snippet!r}"
        )
        raise RecordingError(msg)
    assert isinstance(document, dict)
    version = document.get("version")
    if version != VERSION:
        msg = (
            f"{path} is an imu recording of version {version!r}; this tool reads version {VERSION}"
        )
        raise RecordingError(msg)
    topics = document.get("topics")
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
        msg = f"{path}: the recording header's 'topics' must be a list of topic filters"
        raise RecordingError(msg)
    return RecordingHeader(
        created_at=str(document.get("created_at", "")),
        broker=str(document.get("broker", "")),
        topics=topics,
        version=VERSION,
    )


def _parse_message(path: Path, number: int, raw: bytes) -> RecordedMessage:
    where = f"{path}:{number}"
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        msg = f"{where}: not a recorded message: {exc}"
        raise RecordingError(msg) from exc
    if not isinstance(entry, dict):
        msg = f"{where}: not a recorded message: expected a JSON object"
        raise RecordingError(msg)
    t, topic, content_type = entry.get("t"), entry.get("topic"), entry.get("content_type")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        msg = f"{where}: 't' must be a number of seconds, found {t!r}"
        raise RecordingError(msg)
    if not isinstance(topic, str) or not topic:
        msg = f"{where}: 'topic' must be a non-empty string, found {topic!r}"
        raise RecordingError(msg)
    if content_type is not None and not isinstance(content_type, str):
        msg = f"{where}: 'content_type' must be a string, found {content_type!r}"
        raise RecordingError(msg)
    if "payload" in entry and "payload_b64" in entry:
        msg = f"{where}: a message has 'payload' or 'payload_b64', not both"
        raise RecordingError(msg)
    if "payload" in entry:
        document = entry["payload"]
        if not isinstance(document, dict):
            msg = f"{where}: 'payload' must be a JSON object (other payloads are 'payload_b64')"
            raise RecordingError(msg)
        payload, is_json = orjson.dumps(document), True
    elif isinstance(entry.get("payload_b64"), str):
        try:
            payload = base64.b64decode(entry["payload_b64"], validate=True)
        except binascii.Error as exc:
            msg = f"{where}: 'payload_b64' is not valid base64: {exc}"
            raise RecordingError(msg) from exc
        is_json = False
    else:
        msg = f"{where}: a message needs 'payload' (JSON object) or 'payload_b64' (string)"
        raise RecordingError(msg)
    return RecordedMessage(float(t), topic, payload, content_type, is_json, number)


# --- windows for calibration -----------------------------------------------------------------


def is_window_topic(topic: str) -> bool:
    """True for `*/window` topics (the last level is `window`)."""
    return topic.rsplit("/", 1)[-1] == "window"


def is_samples_topic(topic: str) -> bool:
    """True for `*/samples` topics."""
    return topic.rsplit("/", 1)[-1] == "samples"


def recording_windows(path: Path) -> tuple[NDArray[np.float32], list[str]]:
    """The windows of a recording, as (N, 100, 9) float32, and why other window messages failed.

    Every `*/window` message (JSON or binary float32 frame) is decoded with the node's own
    decoders; one that is not a valid window is skipped, and the second value holds one reason
    per skipped message (`path:line topic: reason`), also logged as a warning with the count.
    Messages on other topics (samples, motifs, ...) are ignored.
    """
    windows: list[NDArray[np.float32]] = []
    skipped: list[str] = []
    for message in read_recording(path):
        if not is_window_topic(message.topic):
            continue
        try:
            if not message.is_json and is_binary_window(message.payload, message.content_type):
                decoded = decode_binary_window(message.payload)
            else:
                decoded = decode_window(message.payload)
        except InputRejectedError as exc:
            skipped.append(f"{path}:{message.line} {message.topic}: {exc.reason}")
            continue
        windows.append(decoded.x)
    if skipped:
        logger.warning(
            "%s: skipped %d window message(s) that are not valid windows; first: %s",
            path,
            len(skipped),
            skipped[0],
        )
    if not windows:
        return np.empty((0, WINDOW_LENGTH, CHANNELS), np.float32), skipped
    return np.stack(windows).astype(np.float32, copy=False), skipped


# --- recording -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Line:
    """One encoded message line, with what the stats need to know about it."""

    data: bytes
    topic: str
    payload_bytes: int


_IDLE: Final = _Line(b"", "", 0)
"""Wakes the writer to flush when nothing arrived."""


class _Writer:
    """Writes encoded lines from a bounded queue on its own thread, flushing every second.

    Messages are encoded on arrival (the MQTT thread), so this thread spends its time in
    `write()` with the GIL released instead of competing with the MQTT thread for it.
    """

    def __init__(self, stream: IO[bytes], queue_size: int) -> None:
        self._stream = stream
        self._queue: queue.Queue[_Line | None] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._messages = self._bytes = self._windows = self._samples = self._dropped = 0
        self._topics: dict[str, int] = {}
        self.error: OSError | None = None
        self.failed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="recording-writer", daemon=True)

    def start(self) -> None:
        """Start the writer thread."""
        self._thread.start()

    def offer(self, line: _Line) -> bool:
        """Queue a line without blocking; False (and counted as dropped) when full."""
        if not self.failed.is_set():
            try:
                self._queue.put_nowait(line)
            except queue.Full:
                pass
            else:
                return True
        self.drop(
            f"writer queue of {self._queue.maxsize} full"
            if self.error is None
            else f"writing failed: {self.error}"
        )
        return False

    def drop(self, reason: str) -> None:
        """Count a message that will not be in the file; the first one is logged."""
        with self._lock:
            self._dropped += 1
            first = self._dropped == 1
        if first:
            logger.warning("recording lost a message (%s); counting every lost one", reason)

    def close(self) -> None:
        """Write everything queued, flush and join the writer thread."""
        if self._thread.ident is None:  # never started
            return
        self._queue.put(None)
        self._thread.join()

    def snapshot(self, elapsed: float, reconnects: int) -> RecordStats:
        """Counts so far."""
        with self._lock:
            return RecordStats(
                messages=self._messages,
                bytes=self._bytes,
                windows=self._windows,
                samples=self._samples,
                topics=dict(self._topics),
                elapsed=elapsed,
                dropped=self._dropped,
                reconnects=reconnects,
            )

    def _run(self) -> None:
        last_flush = time.monotonic()
        dirty = False
        while True:
            try:
                line = self._queue.get(timeout=FLUSH_INTERVAL_S)
            except queue.Empty:
                line = _IDLE
            if line is None:
                break
            if line is not _IDLE:
                self._write(line)
                dirty = True
            now = time.monotonic()
            if dirty and now - last_flush >= FLUSH_INTERVAL_S:
                self._flush()
                last_flush, dirty = now, False
        self._flush()

    def _write(self, line: _Line) -> None:
        if self.error is not None:
            self.drop(f"writing failed: {self.error}")
            return
        try:
            self._stream.write(line.data)
        except OSError as exc:
            self._fail(exc)
            self.drop(f"writing failed: {exc}")
            return
        with self._lock:
            self._messages += 1
            self._bytes += line.payload_bytes
            self._topics[line.topic] = self._topics.get(line.topic, 0) + 1
            if is_window_topic(line.topic):
                self._windows += 1
            elif is_samples_topic(line.topic):
                self._samples += 1

    def _flush(self) -> None:
        if self.error is not None:
            return
        try:
            self._stream.flush()
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        logger.error("writing the recording failed: %s; stopping", exc)
        self.error = exc
        self.failed.set()


def _open_for_writing(out: Path) -> IO[bytes]:
    if out.name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(out, "wb", compresslevel=6))
    return out.open("wb")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        msg = f"MQTT protocol {protocol!r} is not supported; use one of {', '.join(PROTOCOLS)}"
        raise ValueError(msg)


def _connect(session: MqttSession) -> None:
    session.start()
    if not session.wait_connected(CONNECT_TIMEOUT_S):
        session.stop()
        msg = (
            f"cannot connect to {session.settings.address} within {CONNECT_TIMEOUT_S:.0f} s "
            f"({session.counters.last_error or 'no answer'})"
        )
        raise ConnectionError(msg)


def _covers(wide: str, narrow: str) -> bool:
    """True when every topic matching filter `narrow` also matches filter `wide`."""
    wide_levels, narrow_levels = wide.split("/"), narrow.split("/")
    if narrow_levels[0].startswith("$") and wide_levels[0] in {"+", "#"}:
        return False  # wildcards at the first level never match $SYS-style topics
    for i, level in enumerate(wide_levels):
        if level == "#":
            return True
        if i >= len(narrow_levels):
            return False
        other = narrow_levels[i]
        if other == "#" or (level != "+" and (other == "+" or other != level)):
            return False
    return len(narrow_levels) == len(wide_levels)


def _overlap(a: str, b: str) -> bool:
    """True when some topic matches both filters."""
    a_levels, b_levels = a.split("/"), b.split("/")
    for i in range(max(len(a_levels), len(b_levels))):
        x = a_levels[i] if i < len(a_levels) else None
        y = b_levels[i] if i < len(b_levels) else None
        if x == "#" or y == "#":
            return True
        if x is None or y is None:
            return False
        if x != y and "+" not in (x, y):
            return False
    return True


def subscription_filters(topics: list[str]) -> list[str]:
    """The filters worth subscribing to: duplicates and filters inside another one dropped.

    A broker may deliver a message once per matching subscription (mosquitto 2 does), so
    `imu/s1/window` next to `imu/+/window` would record every s1 window twice. Filters that only
    partly overlap cannot be merged; a warning says so.
    """
    kept: list[str] = []
    for i, topic_filter in enumerate(topics):
        others = [o for j, o in enumerate(topics) if j != i]
        wider = [o for o in others if o != topic_filter and _covers(o, topic_filter)]
        if wider or topic_filter in kept:
            logger.info(
                "not subscribing %s separately: %s covers it",
                topic_filter,
                wider[0] if wider else "the same filter",
            )
            continue
        kept.append(topic_filter)
    for i, a in enumerate(kept):
        for b in kept[i + 1 :]:
            if _overlap(a, b):
                logger.warning(
                    "topic filters %s and %s overlap: the broker may deliver a message matching "
                    "both twice, and the recording would hold it twice",
                    a,
                    b,
                )
    return kept


def _await_subscriptions(session: MqttSession, client_id: str) -> None:
    """Return once the broker has processed our SUBSCRIBEs.

    A broker handles one connection's packets in order, so the UNSUBACK of a throw-away
    subscription sent after them proves the real subscriptions are in place.
    """
    barrier = f"imu-recorder/{client_id}/barrier"
    session.route(barrier, lambda message: None, qos=0)
    if not session.unroute(barrier, timeout=5.0):
        logger.debug("no UNSUBACK for the subscription barrier; carrying on")


class _Recorder:
    """The message handler (network thread) and the wait loop (caller's thread) of `record`."""

    def __init__(self, session: MqttSession, writer: _Writer, max_messages: int | None) -> None:
        self.session = session
        self.writer = writer
        self.max_messages = max_messages
        self.started = time.monotonic()
        self.finished = threading.Event()
        self._accepted = 0
        self._last: mqtt.MQTTMessage | None = None

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        """Queue one arrival for the writer (runs on the MQTT network thread)."""
        if message is self._last:  # overlapping filters: paho calls every matching route
            return
        self._last = message
        t = time.monotonic() - self.started
        if self.max_messages is not None and self._accepted >= self.max_messages:
            return
        self._accepted += 1
        properties = message.properties
        content_type = getattr(properties, "ContentType", None) if properties else None
        payload = bytes(message.payload)
        try:
            data = encode_message(t, message.topic, payload, content_type)
        except Exception:  # a bug, not a full disk: lose this message, loudly, and carry on
            logger.exception("cannot encode a message on %s", message.topic)
            self.writer.drop(f"cannot encode a message on {message.topic}")
        else:
            self.writer.offer(_Line(data, message.topic, len(payload)))
        if self.max_messages is not None and self._accepted >= self.max_messages:
            self.finished.set()

    def stats(self) -> RecordStats:
        """Counts so far."""
        return self.writer.snapshot(time.monotonic() - self.started, _reconnects(self.session))

    def wait(
        self,
        duration: float | None,
        stop: threading.Event,
        progress: Callable[[RecordStats], None] | None,
    ) -> None:
        """Block until the duration passes, enough messages arrived, `stop` or a write failure."""
        deadline = math.inf if duration is None else self.started + duration
        next_progress = time.monotonic() + PROGRESS_INTERVAL_S
        while not (stop.is_set() or self.finished.is_set() or self.writer.failed.is_set()):
            now = time.monotonic()
            if now >= deadline:
                return
            if now >= next_progress:
                next_progress = now + PROGRESS_INTERVAL_S
                if progress is not None:
                    progress(self.stats())
            wakeup = min(next_progress, deadline) - time.monotonic()
            self.finished.wait(min(0.1, max(0.0, wakeup)))


def _validate_record_args(
    topics: list[str], duration: float | None, max_messages: int | None, protocol: str
) -> None:
    if not topics:
        msg = "give at least one topic filter to record, e.g. imu/+/window"
        raise ValueError(msg)
    if duration is not None and not duration > 0:
        msg = f"duration must be positive, got {duration}"
        raise ValueError(msg)
    if max_messages is not None and max_messages < 1:
        msg = f"max_messages must be at least 1, got {max_messages}"
        raise ValueError(msg)
    _check_protocol(protocol)


def record(
    broker: str,
    topics: list[str],
    out: Path,
    *,
    duration: float | None = None,
    max_messages: int | None = None,
    protocol: str = "5",
    progress: Callable[[RecordStats], None] | None = None,
    stop: threading.Event | None = None,
    ready: threading.Event | None = None,
    queue_size: int = QUEUE_SIZE,
) -> RecordStats:
    """Subscribe to `topics` (QoS 1) and write every message to `out` until told to stop.

    Stops after `duration` seconds, after `max_messages` messages, when `stop` is set or on
    Ctrl-C (KeyboardInterrupt ends the recording cleanly), whichever comes first; the file is
    complete and closed when this returns. `progress` is called about once per second with the
    counts so far; `ready` is set once the broker has acknowledged the subscriptions. Raises
    ValueError for bad arguments, ConnectionError when the broker cannot be reached and OSError
    when the file cannot be written.
    """
    _validate_record_args(topics, duration, max_messages, protocol)
    address = BrokerAddress.parse(broker)
    client_id = f"imu-recorder-{uuid.uuid4().hex[:8]}"
    session = MqttSession(SessionSettings(address=address, client_id=client_id, protocol=protocol))
    created_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    stream = _open_for_writing(out)
    writer = _Writer(stream, queue_size)
    recorder = _Recorder(session, writer, max_messages)
    try:
        stream.write(encode_header(RecordingHeader(created_at, str(address), list(topics))))
        stream.flush()
        writer.start()
        for topic_filter in subscription_filters(topics):
            session.route(topic_filter, recorder.on_message, qos=1)
        try:
            _connect(session)
            _await_subscriptions(session, client_id)
            logger.info("recording %s from %s to %s", ", ".join(topics), address, out)
            if ready is not None:
                ready.set()
            recorder.wait(duration, stop if stop is not None else threading.Event(), progress)
        except KeyboardInterrupt:
            logger.info("interrupted; finishing %s", out)
        finally:
            session.stop()
    finally:
        writer.close()
        try:
            stream.close()
        except OSError:
            if writer.error is None:
                raise
    if writer.error is not None:
        raise writer.error
    stats = recorder.stats()
    if stats.dropped:
        logger.warning(
            "%d message(s) are missing from %s (dropped; the first warning says why)",
            stats.dropped,
            out,
        )
    logger.info("recorded %s to %s", stats.summary().strip(), out)
    return stats


def _reconnects(session: MqttSession) -> int:
    return max(0, session.counters.connects - 1)


# --- replay ----------------------------------------------------------------------------------


def parse_rewrite(spec: str) -> tuple[str, str]:
    """Parse a CLI rewrite `OLD_PREFIX=NEW_PREFIX` (e.g. `imu/s1/=imu/s1-replay/`)."""
    old, sep, new = spec.partition("=")
    if not sep or not old or not new:
        msg = f"topic rewrite {spec!r} must look like OLD_PREFIX=NEW_PREFIX"
        raise ValueError(msg)
    return old, new


def _rewriter(rewrite: Mapping[str, str] | None) -> Callable[[str], str]:
    rules = sorted((rewrite or {}).items(), key=lambda rule: -len(rule[0]))
    for old, new in rules:
        if not old or not new or any(c in new for c in "+#"):
            msg = f"topic rewrite {old!r} -> {new!r}: both must be non-empty, without + or #"
            raise ValueError(msg)

    def apply(topic: str) -> str:
        for old, new in rules:
            if topic.startswith(old):
                return new + topic[len(old) :]
        return topic

    return apply


class _Replayer:
    """Publishes recorded messages on schedule; one instance per `replay` call."""

    def __init__(
        self,
        session: MqttSession,
        rate: float,
        stop: threading.Event,
        progress: Callable[[ReplayStats], None] | None,
        retopic: Callable[[str], str],
    ) -> None:
        self.session = session
        self.fast = rate == 0 or math.isinf(rate)
        self.rate = rate
        self.stop = stop
        self.progress = progress
        self.retopic = retopic
        self.started = time.monotonic()
        self.next_progress = self.started + PROGRESS_INTERVAL_S
        self.messages = self.bytes = self.loops = self.dropped = 0
        self.max_lag = 0.0

    def stats(self, unacknowledged: int = 0) -> ReplayStats:
        return ReplayStats(
            messages=self.messages,
            bytes=self.bytes,
            loops=self.loops,
            elapsed=time.monotonic() - self.started,
            dropped=self.dropped,
            unacknowledged=unacknowledged,
            max_lag=self.max_lag,
        )

    def one_pass(self, path: Path, begin: float) -> tuple[int, float, float]:
        """Publish the file once, starting at monotonic `begin`; (messages, first t, last t)."""
        count, first, last = 0, 0.0, 0.0
        for message in read_recording(path):
            if count == 0:
                first = message.t
            count, last = count + 1, message.t
            due = begin if self.fast else begin + max(0.0, message.t - first) / self.rate
            if not self._wait_until(due):
                break
            self._throttle()
            if self.stop.is_set():
                break
            if not self.fast:
                self.max_lag = max(self.max_lag, time.monotonic() - due)
            topic = self.retopic(message.topic)
            if self.session.publish(
                topic, message.payload, qos=1, content_type=message.content_type
            ):
                self.messages += 1
                self.bytes += len(message.payload)
            else:
                self.dropped += 1
                if self.dropped == 1:
                    logger.warning("the MQTT client refused a publish (queue full); counting")
        return count, first, last

    def tick(self) -> None:
        """Report progress when a second has passed."""
        now = time.monotonic()
        if now >= self.next_progress:
            self.next_progress = now + PROGRESS_INTERVAL_S
            if self.progress is not None:
                self.progress(self.stats(self.session.pending_publishes()))

    def _wait_until(self, due: float) -> bool:
        """Sleep until `due` (monotonic), reporting progress; False when stopped."""
        while True:
            self.tick()
            remaining = due - time.monotonic()
            if remaining <= 0:
                return not self.stop.is_set()
            if self.stop.wait(min(remaining, max(0.0, self.next_progress - time.monotonic()))):
                return False

    def _throttle(self) -> None:
        while self.session.pending_publishes() >= MAX_IN_FLIGHT and not self.stop.is_set():
            self.tick()
            self.stop.wait(0.001)


def replay(
    path: Path,
    broker: str,
    *,
    rate: float = 1.0,
    loop: bool = False,
    protocol: str = "5",
    progress: Callable[[ReplayStats], None] | None = None,
    stop: threading.Event | None = None,
    rewrite: Mapping[str, str] | None = None,
) -> ReplayStats:
    """Republish a recording's messages to their topics (QoS 1) on their recorded schedule.

    Message i goes out `(t_i - t_first) / rate` seconds after the pass starts (rate 2 is twice
    as fast; 0 or infinity as fast as the broker acknowledges). With `loop` the file is replayed
    until `stop` is set or Ctrl-C, each pass one mean message interval after the last. `rewrite`
    maps topic prefixes to new ones (longest prefix wins), e.g. `{"imu/": "replay/imu/"}`.
    Payloads are the recorded bytes (JSON objects re-serialised by orjson, same values) and the
    MQTT 5 content type is restored. Returns after every publish is acknowledged (or 10 s).
    Raises RecordingError for a file that is not a recording (checked before connecting),
    ValueError for a bad rate and ConnectionError when the broker cannot be reached.
    """
    if math.isnan(rate) or rate < 0:
        msg = f"rate must be >= 0 (0 or inf: as fast as possible), got {rate}"
        raise ValueError(msg)
    _check_protocol(protocol)
    retopic = _rewriter(rewrite)
    read_header(path)
    address = BrokerAddress.parse(broker)
    client_id = f"imu-replay-{uuid.uuid4().hex[:8]}"
    session = MqttSession(SessionSettings(address=address, client_id=client_id, protocol=protocol))
    stop = stop if stop is not None else threading.Event()
    _connect(session)
    replayer = _Replayer(session, rate, stop, progress, retopic)
    logger.info(
        "replaying %s to %s at %s%s",
        path,
        address,
        "full speed" if replayer.fast else f"{rate:g}x",
        " in a loop" if loop else "",
    )
    try:
        begin = time.monotonic()
        while not stop.is_set():
            count, first, last = replayer.one_pass(path, begin)
            if stop.is_set():
                break
            replayer.loops += 1
            if not loop:
                break
            if count == 0:
                logger.warning("%s holds no messages; nothing to loop over", path)
                break
            if not replayer.fast:
                gap = (last - first) / (count - 1) if count > 1 else 0.0
                begin += (last - first + gap) / rate
    except KeyboardInterrupt:
        logger.info("interrupted; waiting for acknowledgements")
    finally:
        acknowledged = session.wait_published(ACK_TIMEOUT_S)
        unacknowledged = 0 if acknowledged else session.pending_publishes()
        session.stop()
    stats = replayer.stats(unacknowledged)
    if stats.unacknowledged or stats.dropped:
        logger.warning(
            "replay incomplete: %d dropped, %d unacknowledged", stats.dropped, stats.unacknowledged
        )
    logger.info("replayed %s", stats.summary().strip())
    return stats
