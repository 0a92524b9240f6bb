"""Headered binary window frames: layout, detection without guessing, seq, and their senders.

A frame is a 16-byte header (magic `\\x89IMU`, version, flags, reserved, uint64 seq) and the
100 x 9 little-endian float32 window (docs/topics.md, Binary frames). A frame is never read as
JSON, nor JSON as a frame; header-less 3600-byte frames are still taken (deprecated).
"""

from __future__ import annotations

import queue
import re
import struct
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from fleet.simulate.sensors import SensorSimulator
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.waiting import unique, wait_until
from node.ingest.router import Ingest
from node.ingest.windower import SampleWindower
from node.metrics import NodeMetrics
from node.reporting import ErrorReporter
from node.tools.local_broker import LocalBroker
from node.work import WorkItem
from schemas import topics
from schemas.codec import (
    BINARY_FRAMES_SECTION,
    InputRejectedError,
    decode_any_window,
    decode_binary_window,
    decode_window,
    encode_binary_window,
    is_binary_window,
)
from schemas.limits import (
    BINARY_CONTENT_TYPE,
    BINARY_WINDOW_BYTES,
    CHANNELS,
    FLOAT32_MAX,
    FRAME_BYTES,
    FRAME_HEADER_BYTES,
    FRAME_MAGIC,
    WINDOW_LENGTH,
)
from schemas.messages import ErrorKind, MotifResult, WindowMessage

SEQ_MAX = 2**63 - 1
FINITE_F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
WINDOWS = arrays(np.float32, (WINDOW_LENGTH, CHANNELS), elements=FINITE_F32)
SEQS = st.none() | st.integers(0, SEQ_MAX)


def window(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 30, (WINDOW_LENGTH, CHANNELS)).astype(np.float32)


def header(*, magic: bytes = FRAME_MAGIC, version: int = 1, flags: int = 1,
           reserved: int = 0, seq: int = 0) -> bytes:  # fmt: skip
    return struct.pack("<4sBBHQ", magic, version, flags, reserved, seq)


def body(x: np.ndarray) -> bytes:
    return x.astype("<f4").tobytes()


def rejected(decode: Callable[[], object]) -> InputRejectedError:
    with pytest.raises(InputRejectedError) as info:
        decode()
    assert info.value.reason.strip()
    return info.value


# ---------------------------------------------------------------------------------------------
# Layout and round trip


def test_header_constants() -> None:
    assert FRAME_MAGIC == b"\x89IMU"
    assert FRAME_HEADER_BYTES == 16
    assert FRAME_BYTES == 3616
    for not_json in b' \t\r\n{["-0123456789tfn':  # every byte a JSON text may start with
        assert FRAME_MAGIC[0] != not_json


def test_encoded_frame_layout_byte_by_byte() -> None:
    x = window(1)
    frame = encode_binary_window(x, 0x0102030405060708)
    assert len(frame) == FRAME_BYTES
    assert frame[:4] == b"\x89IMU"
    assert frame[4] == 1  # version
    assert frame[5] == 0x01  # flags: seq present
    assert frame[6:8] == b"\x00\x00"  # reserved
    assert frame[8:16] == bytes([8, 7, 6, 5, 4, 3, 2, 1])  # uint64 little-endian
    assert frame[16:] == body(x)
    assert np.frombuffer(frame, "<f4", offset=16)[2 * CHANNELS + 3] == x[2, 3]  # row-major


def test_frame_without_seq_has_flag_and_field_clear() -> None:
    frame = encode_binary_window(window(), None)
    assert frame[5] == 0
    assert frame[8:16] == bytes(8)
    decoded = decode_any_window(frame, None)
    assert decoded.seq is None
    assert decoded.t0 is None


@given(x=WINDOWS, seq=SEQS)
@settings(max_examples=60, deadline=None)
def test_round_trip(x: np.ndarray, seq: int | None) -> None:
    frame = encode_binary_window(x, seq)
    for content_type in (None, "", BINARY_CONTENT_TYPE):
        assert is_binary_window(frame, content_type)
        decoded = decode_any_window(frame, content_type)
        assert decoded.seq == seq
        assert decoded.x.dtype == np.float32
        assert decoded.x.shape == (WINDOW_LENGTH, CHANNELS)
        np.testing.assert_array_equal(decoded.x, x)
    decoded = decode_binary_window(frame)
    decoded.x[0, 0] = 1.0  # a private, writable copy


def test_round_trip_of_float64_and_int_windows() -> None:
    wide = np.random.default_rng(3).normal(0, 9, (WINDOW_LENGTH, CHANNELS))
    decoded = decode_any_window(encode_binary_window(wide, 4), None)
    np.testing.assert_array_equal(decoded.x, wide.astype(np.float32))
    ints = np.arange(WINDOW_LENGTH * CHANNELS).reshape(WINDOW_LENGTH, CHANNELS)
    decoded = decode_any_window(encode_binary_window(ints.tolist(), np.int64(9)), None)
    np.testing.assert_array_equal(decoded.x, ints.astype(np.float32))
    assert decoded.seq == 9
    assert type(decoded.seq) is int


def test_float32_extremes_survive() -> None:
    x = window()
    x[0, 0], x[1, 1], x[2, 2], x[3, 3] = FLOAT32_MAX, -FLOAT32_MAX, -0.0, 1e-45
    decoded = decode_any_window(encode_binary_window(x, SEQ_MAX), None)
    np.testing.assert_array_equal(decoded.x, x)
    assert np.signbit(decoded.x[2, 2])
    assert decoded.seq == SEQ_MAX


def test_the_documented_python_example_writes_the_same_frames() -> None:
    blocks = re.findall(r"```python\n(.*?)```", BINARY_FRAMES_SECTION, re.DOTALL)
    assert len(blocks) == 1
    namespace: dict[str, Any] = {}
    exec(compile(blocks[0], "docs/topics.md", "exec"), namespace)
    window_frame = namespace["window_frame"]
    x = window(5)
    for seq in (None, 0, 7, SEQ_MAX):
        assert window_frame(x, seq) == encode_binary_window(x, seq)
        assert window_frame(x.astype(np.float64), seq) == encode_binary_window(x, seq)


def test_the_documented_byte_table_matches_the_encoder() -> None:
    frame = encode_binary_window(window(), 258)
    rows = re.findall(r"^\| (\d+) \| (\d+) \| (\w+) \|", BINARY_FRAMES_SECTION, re.MULTILINE)
    layout = {name: (int(offset), int(size)) for offset, size, name in rows}
    assert layout == {
        "magic": (0, 4),
        "version": (4, 1),
        "flags": (5, 1),
        "reserved": (6, 2),
        "seq": (8, 8),
        "window": (16, 3600),
    }
    assert sum(size for _, size in layout.values()) == len(frame)
    offset, size = layout["seq"]
    assert int.from_bytes(frame[offset : offset + size], "little") == 258


# ---------------------------------------------------------------------------------------------
# Never misread: frames are not JSON, JSON is not a frame


@given(x=WINDOWS, seq=SEQS)
@settings(max_examples=40, deadline=None)
def test_a_frame_is_never_json(x: np.ndarray, seq: int | None) -> None:
    frame = encode_binary_window(x, seq)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(frame)
    with pytest.raises(ValidationError):
        WindowMessage.model_validate_json(frame)
    assert rejected(lambda: decode_window(frame)).kind is ErrorKind.MALFORMED


@pytest.mark.parametrize("seq", [None, 0, 5])
def test_a_headered_frame_whose_window_starts_with_a_brace(seq: int | None) -> None:
    x = window()
    first = bytearray(body(x[:1, :1]))
    first[0] = ord("{")  # the low byte of the first float
    x[0, 0] = np.frombuffer(bytes(first), "<f4")[0]
    assert body(x)[:1] == b"{"
    frame = encode_binary_window(x, seq)
    assert frame[FRAME_HEADER_BYTES : FRAME_HEADER_BYTES + 1] == b"{"
    for content_type in (None, BINARY_CONTENT_TYPE):
        decoded = decode_any_window(frame, content_type)
        np.testing.assert_array_equal(decoded.x, x)
        assert decoded.seq == seq
    # the same window header-less and without a content type: the deprecated ambiguity
    assert not is_binary_window(body(x), None)
    error = rejected(lambda: decode_any_window(body(x), None))
    assert error.kind is ErrorKind.MALFORMED
    assert "header-less" in error.reason
    assert BINARY_CONTENT_TYPE in error.reason
    assert decode_any_window(body(x), BINARY_CONTENT_TYPE).seq is None  # content type: fine


def test_json_windows_are_still_json() -> None:
    payload = orjson.dumps({"x": window().tolist(), "seq": 3})
    assert not is_binary_window(payload, None)
    assert decode_any_window(payload, None).seq == 3
    assert decode_any_window(payload, "application/json").seq == 3


def test_a_frame_sent_as_json_is_refused_with_a_hint() -> None:
    frame = encode_binary_window(window(), 1)
    assert not is_binary_window(frame, "application/json")  # the content type decides
    error = rejected(lambda: decode_any_window(frame, "application/json"))
    assert error.kind is ErrorKind.MALFORMED
    assert "frame magic" in error.reason
    assert BINARY_CONTENT_TYPE in error.reason


# ---------------------------------------------------------------------------------------------
# Deprecated header-less frames


def test_header_less_frames_are_still_taken() -> None:
    x = window(2)
    assert decode_any_window(body(x), None).seq is None
    np.testing.assert_array_equal(decode_any_window(body(x), None).x, x)
    np.testing.assert_array_equal(decode_any_window(body(x), BINARY_CONTENT_TYPE).x, x)


def test_a_header_less_frame_that_happens_to_start_with_the_magic_is_read_by_its_length() -> None:
    raw = bytearray(body(window()))
    raw[:4] = FRAME_MAGIC
    assert len(raw) == BINARY_WINDOW_BYTES
    decoded = decode_any_window(bytes(raw), None)
    assert decoded.seq is None
    assert decoded.x[0, 0] == np.frombuffer(FRAME_MAGIC, "<f4")[0]


# ---------------------------------------------------------------------------------------------
# Refused frames


@pytest.mark.parametrize("content_type", [None, BINARY_CONTENT_TYPE])
def test_bad_magic(content_type: str | None) -> None:
    frame = b"\x89IMX" + encode_binary_window(window(), 1)[4:]
    error = rejected(lambda: decode_any_window(frame, content_type))
    assert error.kind is ErrorKind.MALFORMED
    if content_type:  # declared a frame: the reason names the magic
        assert "magic" in error.reason
        assert "89 49 4D 55" in error.reason
        assert "3616" in error.reason


@pytest.mark.parametrize(
    "frame",
    [
        FRAME_MAGIC,
        header(),
        header() + body(window())[:-4],
        header() + body(window())[:-1],
        header() + body(window()) + b"\x00",
        header() + body(window()) * 2,
    ],
    ids=["magic-only", "header-only", "short-by-a-float", "short-by-a-byte", "long", "double"],
)
def test_wrong_length(frame: bytes) -> None:
    for content_type in (None, BINARY_CONTENT_TYPE):
        assert is_binary_window(frame, content_type)
        error = rejected(lambda ct=content_type: decode_any_window(frame, ct))
        assert error.kind is ErrorKind.MALFORMED
        assert str(len(frame)) in error.reason


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_version(version: int) -> None:
    frame = header(version=version) + body(window())
    error = rejected(lambda: decode_any_window(frame, None))
    assert error.kind is ErrorKind.MALFORMED
    assert f"version {version}" in error.reason


def test_an_unsupported_version_is_named_before_its_length() -> None:
    error = rejected(lambda: decode_any_window(header(version=2) + b"\x00" * 10, None))
    assert "version 2" in error.reason


@pytest.mark.parametrize("flags", [0x02, 0x03, 0x80, 0xFF])
def test_unknown_flags(flags: int) -> None:
    error = rejected(lambda: decode_any_window(header(flags=flags) + body(window()), None))
    assert error.kind is ErrorKind.MALFORMED
    assert f"0x{flags:02x}" in error.reason


def test_reserved_bytes_must_be_zero() -> None:
    error = rejected(lambda: decode_any_window(header(reserved=1) + body(window()), None))
    assert error.kind is ErrorKind.MALFORMED
    assert "reserved" in error.reason


def test_a_seq_without_its_flag_is_refused() -> None:
    error = rejected(lambda: decode_any_window(header(flags=0, seq=5) + body(window()), None))
    assert error.kind is ErrorKind.MALFORMED
    assert "seq 5" in error.reason


@pytest.mark.parametrize("seq", [2**63, 2**64 - 1])
def test_a_seq_beyond_the_contract_is_invalid(seq: int) -> None:
    error = rejected(lambda: decode_any_window(header(seq=seq) + body(window()), None))
    assert error.kind is ErrorKind.INVALID
    assert str(seq) in error.reason


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_window(bad: float) -> None:
    x = window()
    x[42, 6] = bad
    error = rejected(lambda: decode_any_window(header(seq=1) + body(x), None))
    assert error.kind is ErrorKind.NON_FINITE
    assert "row 42, channel 6" in error.reason


# ---------------------------------------------------------------------------------------------
# seq: the header, the MQTT 5 user property, or both when they agree


def test_the_user_property_seq_fills_in_when_the_window_has_none() -> None:
    assert decode_any_window(encode_binary_window(window(), None), None, user_seq=8).seq == 8
    assert decode_any_window(body(window()), None, user_seq=9).seq == 9
    assert decode_any_window(orjson.dumps({"x": window().tolist()}), None, user_seq=3).seq == 3


def test_the_same_seq_in_header_and_user_property_is_fine() -> None:
    assert decode_any_window(encode_binary_window(window(), 11), None, user_seq=11).seq == 11


def test_a_seq_mismatch_is_refused() -> None:
    error = rejected(
        lambda: decode_any_window(encode_binary_window(window(), 11), None, user_seq=12)
    )
    assert error.kind is ErrorKind.INVALID
    assert "frame header" in error.reason
    assert "11" in error.reason
    assert "12" in error.reason
    json_window = orjson.dumps({"x": window().tolist(), "seq": 4})
    error = rejected(lambda: decode_any_window(json_window, None, user_seq=5))
    assert error.kind is ErrorKind.INVALID
    assert "JSON window" in error.reason


# ---------------------------------------------------------------------------------------------
# encode_binary_window refuses what a node would refuse


@pytest.mark.parametrize(
    "x",
    [
        np.zeros((WINDOW_LENGTH - 1, CHANNELS)),
        np.zeros((WINDOW_LENGTH, CHANNELS + 1)),
        np.zeros(WINDOW_LENGTH * CHANNELS),
        np.zeros((1, WINDOW_LENGTH, CHANNELS)),
        np.full((WINDOW_LENGTH, CHANNELS), "1.0"),
        np.ones((WINDOW_LENGTH, CHANNELS), dtype=bool),
        [[1.0] * CHANNELS] * (WINDOW_LENGTH - 1) + [[1.0] * (CHANNELS - 1)],
    ],
    ids=["rows", "channels", "flat", "batched", "strings", "booleans", "ragged"],
)
def test_encode_refuses_a_window_of_the_wrong_shape_or_type(x: Any) -> None:
    with pytest.raises(ValueError, match="100 x 9"):
        encode_binary_window(x, 0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39, -3.5e38])
def test_encode_refuses_values_a_node_would_refuse(bad: float) -> None:
    x = window().astype(np.float64)
    x[7, 2] = bad
    with pytest.raises(ValueError, match="row 7, channel 2"):
        encode_binary_window(x, 0)


@pytest.mark.parametrize("seq", [-1, 2**63, 2**64])
def test_encode_refuses_a_seq_out_of_range(seq: int) -> None:
    with pytest.raises(ValueError, match="seq"):
        encode_binary_window(window(), seq)


@pytest.mark.parametrize("seq", [True, 1.0, "1"])
def test_encode_refuses_a_seq_that_is_not_an_integer(seq: Any) -> None:
    with pytest.raises(TypeError):
        encode_binary_window(window(), seq)


# ---------------------------------------------------------------------------------------------
# The node's ingest: the header's seq de-duplicates like the user property


class Harness:
    """An Ingest with a real queue, windower, reporter and metrics; reports are kept."""

    def __init__(self) -> None:
        self.work: queue.Queue[WorkItem] = queue.Queue()
        self.metrics = NodeMetrics()
        self.reports: list[dict[str, object]] = []
        reporter = ErrorReporter("n1", self._publish, self.metrics, per_second=1000)
        self.ingest = Ingest(self.work, SampleWindower(50), reporter, self.metrics)

    def _publish(self, topic: str, payload: bytes) -> bool:
        self.reports.append(orjson.loads(payload))
        return True

    def send(self, payload: bytes, *, dup: bool = False, user_seq: str | None = None) -> None:
        message = mqtt.MQTTMessage(topic=topics.window("s1").encode())
        message.payload = payload
        message.dup = dup
        if user_seq is not None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.UserProperty = ("seq", user_seq)
            message.properties = properties
        self.ingest.on_window(message)

    def taken(self) -> list[int | None]:
        items = []
        while not self.work.empty():
            items.append(self.work.get_nowait().seq)
        return items


def test_ingest_takes_the_seq_from_the_header_and_skips_a_resent_frame() -> None:
    h = Harness()
    for seq in range(3):
        h.send(encode_binary_window(window(seq), seq))
    h.send(encode_binary_window(window(2), 2), dup=True)  # the broker re-sends one taken
    h.send(encode_binary_window(window(3), 3), dup=True)  # re-sent, but never reached us: new
    assert h.taken() == [0, 1, 2, 3]
    assert h.metrics.redelivered == 1
    assert h.reports == []


def test_ingest_header_and_user_property_seq() -> None:
    h = Harness()
    h.send(encode_binary_window(window(), 0), user_seq="0")
    h.send(encode_binary_window(window(), None), user_seq="1")
    h.send(encode_binary_window(window(), 2), user_seq="7")  # they differ: refused
    h.send(encode_binary_window(window(), 2))
    assert h.taken() == [0, 1, 2]
    assert [r["kind"] for r in h.reports] == [ErrorKind.INVALID]
    assert "user property" in str(h.reports[0]["reason"])
    assert h.reports[0]["sensor_id"] == "s1"


def test_ingest_reports_a_bad_frame_and_keeps_going() -> None:
    h = Harness()
    h.send(header(version=9) + body(window()))
    h.send(encode_binary_window(window(), 0))
    assert h.taken() == [0]
    assert [r["kind"] for r in h.reports] == [ErrorKind.MALFORMED]


def test_ingest_work_items_hold_the_frame_window() -> None:
    h = Harness()
    x = window(8)
    h.send(encode_binary_window(x, 5))
    item = h.work.get_nowait()
    assert item.seq == 5
    np.testing.assert_array_equal(item.x, x)


# ---------------------------------------------------------------------------------------------
# The sensor simulator sends headered frames


def test_simulator_binary_frames_need_window_mode(broker: LocalBroker) -> None:
    with pytest.raises(ValueError, match="window mode"):
        SensorSimulator(broker.url, mode="samples", encoding="binary")


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_simulator_sends_headered_frames(broker: LocalBroker, protocol: Any) -> None:
    prefix = unique("bin")
    content_types: list[str | None] = []
    probe = Probe(broker.url)
    probe.client.on_message = _recording(probe, content_types)
    probe.subscribe(f"imu/{prefix}-000/window")
    simulator = SensorSimulator(
        broker.url, sensors=1, rate_hz=1000, mode="window", hop=100, prefix=prefix,
        protocol=protocol, encoding="binary",
    )  # fmt: skip
    simulator.start()
    try:
        frames = probe.wait_for(f"imu/{prefix}-000/window", 3, timeout=15)
    finally:
        simulator.stop()
        probe.close()
    wait_until(lambda: simulator.stats().windows >= 3, what="simulator stats")
    for index, received in enumerate(frames[:3]):
        assert len(received.payload) == FRAME_BYTES
        assert received.payload.startswith(FRAME_MAGIC)
        decoded = decode_any_window(received.payload, None)
        assert decoded.seq == index
        assert np.isfinite(decoded.x).all()
        assert decoded.x.std() > 0  # a real signal, not zeros
    expected = BINARY_CONTENT_TYPE if protocol == "5" else None
    assert content_types[:3] == [expected] * 3


def _recording(probe: Probe, content_types: list[str | None]) -> Any:
    """Probe's own message handler, also keeping each message's MQTT 5 content type."""
    keep = Probe._on_message

    def on_message(client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        properties = getattr(message, "properties", None)
        content_types.append(getattr(properties, "ContentType", None) if properties else None)
        keep(probe, client, userdata, message)

    return on_message


# ---------------------------------------------------------------------------------------------
# End to end: a node serves headered frames, with their seq, whatever their first window byte


def test_node_serves_headered_frames_end_to_end(
    broker: LocalBroker, start_node: NodeFactory, probe: Probe
) -> None:
    app = start_node()
    sensor = unique("frames")
    probe.subscribe(topics.motifs(sensor), topics.node_errors(app.node_id))
    x = window(4)
    x[0, 0] = np.frombuffer(b"{" + body(x)[1:4], "<f4")[0]  # the 1.6% case, header-less
    assert body(x)[:1] == b"{"
    probe.publish(topics.window(sensor), encode_binary_window(x, 41))  # MQTT 5, no content type
    probe.publish(topics.window(sensor), encode_binary_window(window(5), 42))
    results = probe.wait_for(topics.motifs(sensor), 2)
    assert sorted(MotifResult.model_validate_json(r.payload).seq or 0 for r in results) == [41, 42]
    assert probe.on(topics.node_errors(app.node_id)) == []
