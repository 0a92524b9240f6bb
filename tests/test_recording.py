"""Recording and replay against a real mosquitto: file format, round trip, timing, calibration."""

from __future__ import annotations

import base64
import gzip
import logging
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from common.errors import BundleError
from fleet.bundles.calibration import load_calibration
from fleet.recording import (
    RecordedMessage,
    RecordingError,
    RecordingHeader,
    RecordStats,
    ReplayStats,
    encode_header,
    encode_message,
    parse_rewrite,
    read_header,
    read_recording,
    record,
    recording_windows,
    replay,
    subscription_filters,
)
from helpers.mqtt import Probe, Received
from helpers.waiting import unique
from node.tools.local_broker import LocalBroker
from schemas import topics
from schemas.limits import BINARY_WINDOW_BYTES, CHANNELS, WINDOW_LENGTH

WINDOWS = 14
"""JSON windows in the shared recording (the motif head needs at least 12)."""


def window_array(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 3, (WINDOW_LENGTH, CHANNELS)).round(4).astype(np.float32)


def json_window(seed: int) -> bytes:
    return orjson.dumps({"x": window_array(seed).tolist(), "seq": seed, "t0": 1000.0 + seed})


def binary_window(seed: int) -> bytes:
    return window_array(seed).astype("<f4").tobytes()


@dataclass
class Recorded:
    """What the shared recording session published and what `record` returned."""

    path: Path
    published: list[tuple[str, bytes]]
    stats: RecordStats
    progress: list[RecordStats]
    sensor: str


class Recorder:
    """Runs `record` in a thread; `start()` returns once the broker holds its subscriptions."""

    def __init__(self, broker: LocalBroker, topic_filters: list[str], out: Path, **kw: Any):
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.progress: list[RecordStats] = []
        self.result: RecordStats | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = record(
                    broker.url,
                    topic_filters,
                    out,
                    ready=self.ready,
                    stop=self.stop,
                    progress=self.progress.append,
                    **kw,
                )
            except BaseException as exc:
                self.error = exc
                self.ready.set()

        self.thread = threading.Thread(target=run, daemon=True)

    def start(self) -> Recorder:
        self.thread.start()
        assert self.ready.wait(10), "recorder never subscribed"
        assert self.error is None, self.error
        return self

    def join(self, timeout: float = 15.0) -> RecordStats:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "record() did not return"
        assert self.error is None, self.error
        assert self.result is not None
        return self.result


def record_session(
    broker: LocalBroker, out: Path, *, gap_s: float = 0.0, extra: int = 2
) -> Recorded:
    """Record JSON windows, samples, a binary frame and an invalid window from one sensor."""
    sensor = unique("rec")
    published: list[tuple[str, bytes]] = [
        (topics.window(sensor), json_window(i)) for i in range(WINDOWS)
    ]
    published.insert(3, (topics.samples(sensor), orjson.dumps({"seq": 0, "samples": [[0.5] * 9]})))
    published.insert(5, (topics.window(sensor), binary_window(99)))
    published.insert(7, (topics.window(sensor), b'{"x": [[1, 2, 3]]}'))  # invalid, whitespace
    recorder = Recorder(
        broker,
        [topics.window(sensor), topics.samples(sensor)],
        out,
        max_messages=len(published),
    ).start()
    sender = Probe(broker.url)
    try:
        for topic, payload in published:
            sender.publish(topic, payload)
            time.sleep(gap_s)
        for i in range(extra):  # past max_messages: not recorded
            sender.publish(topics.window(sensor), json_window(1000 + i))
        stats = recorder.join()
    finally:
        sender.close()
    return Recorded(out, published, stats, recorder.progress, sensor)


@pytest.fixture(scope="module")
def recorded(broker: LocalBroker, tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """One recording for the module, messages 0.1 s apart (so replay timing can be checked)."""
    return record_session(broker, tmp_path_factory.mktemp("rec") / "session.jsonl", gap_s=0.1)


class TimedProbe(Probe):
    """A Probe that also notes when each message arrived."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.arrivals: list[float] = []
        self.client.on_message = self._stamp

    def _stamp(self, client: Any, userdata: Any, message: Any) -> None:
        self.arrivals.append(time.monotonic())
        self._on_message(client, userdata, message)


@pytest.fixture
def timed_probe(broker: LocalBroker) -> Iterator[TimedProbe]:
    """A probe that timestamps arrivals."""
    client = TimedProbe(broker.url)
    yield client
    client.close()


def as_json_or_bytes(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload


# --- the file --------------------------------------------------------------------------------


def test_recording_holds_every_message_in_order(recorded: Recorded) -> None:
    header = read_header(recorded.path)
    assert header.topics == [topics.window(recorded.sensor), topics.samples(recorded.sensor)]
    assert header.broker.startswith("mqtt://127.0.0.1:")
    assert header.created_at.endswith("Z")

    messages = list(read_recording(recorded.path))
    assert [(m.topic, m.payload) for m in messages[:3]] == recorded.published[:3]
    assert len(messages) == len(recorded.published)  # the two past max_messages are not there
    for message, (topic, payload) in zip(messages, recorded.published, strict=True):
        assert message.topic == topic
        if payload.startswith(b"{") and b" " not in payload:  # compact JSON: byte for byte
            assert message.payload == payload
            assert message.is_json
        else:  # JSON with spaces: same values; binary: same bytes
            assert as_json_or_bytes(message.payload) == as_json_or_bytes(payload)
    binary = messages[5]
    assert not binary.is_json
    assert binary.payload == binary_window(99)
    times = [m.t for m in messages]
    assert times == sorted(times)
    assert 0 < times[0] < times[-1]
    assert times[-1] - times[0] >= 0.1 * (len(messages) - 1) * 0.9


def test_recording_lines_are_readable_json(recorded: Recorded) -> None:
    lines = recorded.path.read_bytes().splitlines()
    header = orjson.loads(lines[0])
    assert header["format"] == "imu-recording"
    assert header["version"] == 1
    assert set(header) == {"format", "version", "created_at", "broker", "topics"}
    first = orjson.loads(lines[1])
    assert set(first) == {"t", "topic", "payload"}
    assert first["payload"]["seq"] == 0
    frame = orjson.loads(lines[6])
    assert set(frame) == {"t", "topic", "payload_b64"}
    assert base64.b64decode(frame["payload_b64"]) == binary_window(99)


def test_record_stats_count_what_is_in_the_file(recorded: Recorded) -> None:
    stats = recorded.stats
    assert stats.messages == len(recorded.published)
    assert stats.windows == len(recorded.published) - 1
    assert stats.samples == 1
    assert stats.topics == {
        topics.window(recorded.sensor): len(recorded.published) - 1,
        topics.samples(recorded.sensor): 1,
    }
    assert stats.bytes == sum(len(p) for _, p in recorded.published)
    assert stats.dropped == 0
    assert stats.elapsed > 1.0
    assert "messages" in stats.summary()


def test_progress_is_reported_every_second(recorded: Recorded) -> None:
    assert recorded.stats.elapsed > 1.5
    assert len(recorded.progress) >= 1
    assert all(isinstance(p, RecordStats) for p in recorded.progress)
    counts = [p.messages for p in recorded.progress]
    assert counts == sorted(counts)
    assert counts[-1] <= recorded.stats.messages


def test_encode_keeps_anything_that_json_would_change_as_bytes() -> None:
    cases = {
        b'{"a": 1.5, "b": [1, 2]}': True,
        b'{"big": 123456789012345678901234567890}': False,  # orjson would make it a float
        b'"online"': False,  # JSON, but not an object
        b"[1, 2]": False,
        b"\xff\xfe not json": False,
        b"": False,
        b"{" * 300 + b"}" * 300: False,  # deeper than orjson writes
        b'{"deep": ' + b"[" * 300 + b"]" * 300 + b"}": False,
    }
    for payload, inline in cases.items():
        line = orjson.loads(encode_message(0.25, "a/b", payload))
        assert ("payload" in line) is inline, payload
        if not inline:
            assert base64.b64decode(line["payload_b64"]) == payload


def test_content_type_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "ct.jsonl"
    frame = binary_window(1)
    path.write_bytes(
        encode_header(RecordingHeader("2025-01-01T00:00:00Z", "mqtt://h:1883", ["#"]))
        + encode_message(0.0, "imu/s/window", frame, "application/x-imu-window-f32")
    )
    (message,) = read_recording(path)
    assert message.content_type == "application/x-imu-window-f32"
    assert message.payload == frame


def test_overlapping_filters_record_each_message_once(broker: LocalBroker, tmp_path: Path) -> None:
    sensor = unique("dup")
    out = tmp_path / "dup.jsonl"
    recorder = Recorder(
        broker, [topics.window(sensor), "imu/+/window", topics.window(sensor)], out, max_messages=2
    ).start()
    sender = Probe(broker.url)
    try:
        sender.publish(topics.window(sensor), json_window(1))
        sender.publish(topics.window(sensor), json_window(2))
        recorder.join()
    finally:
        sender.close()
    assert [m.payload for m in read_recording(out)] == [json_window(1), json_window(2)]
    assert subscription_filters(["a/b", "a/+", "a/#", "c"]) == ["a/#", "c"]


def test_gzip_recording(broker: LocalBroker, tmp_path: Path) -> None:
    session = record_session(broker, tmp_path / "session.jsonl.gz", extra=0)
    raw = session.path.read_bytes()
    assert raw[:2] == b"\x1f\x8b"
    assert gzip.decompress(raw).startswith(b'{"format":"imu-recording"')
    messages = list(read_recording(session.path))
    assert [m.topic for m in messages] == [t for t, _ in session.published]
    assert messages[5].payload == binary_window(99)
    calib = load_calibration(session.path)
    assert len(calib.windows) == WINDOWS + 1


def test_record_stops_on_duration_and_on_stop(broker: LocalBroker, tmp_path: Path) -> None:
    stats = record(broker.url, [topics.window(unique("idle"))], tmp_path / "a.jsonl", duration=0.5)
    assert stats.elapsed >= 0.5  # it returned by itself, after the duration
    assert stats.messages == 0
    assert list(read_recording(tmp_path / "a.jsonl")) == []

    recorder = Recorder(broker, [topics.window(unique("idle"))], tmp_path / "b.jsonl").start()
    recorder.stop.set()
    assert recorder.join(5).messages == 0


def test_waiting_does_not_spin(broker: LocalBroker, tmp_path: Path) -> None:
    """Without a progress callback, record and replay still sleep while nothing happens."""
    cpu = time.process_time()
    record(broker.url, [topics.window(unique("idle"))], tmp_path / "idle.jsonl", duration=1.2)
    header = encode_header(RecordingHeader("2025-01-01T00:00:00Z", "mqtt://h:1883", ["#"]))
    sensor = unique("idle")
    path = tmp_path / "gap.jsonl"
    path.write_bytes(
        header
        + encode_message(0.0, topics.window(sensor), b'{"v":0}')
        + encode_message(1.2, topics.window(sensor), b'{"v":1}')
    )
    began = time.monotonic()
    assert replay(path, broker.url).messages == 2
    assert time.monotonic() - began >= 1.2
    assert time.process_time() - cpu < 0.12  # busy-waiting 0.2 s of the 1.2 s costs more


def test_record_refuses_bad_arguments(tmp_path: Path) -> None:
    out = tmp_path / "x.jsonl"
    with pytest.raises(ValueError, match="at least one topic"):
        record("mqtt://127.0.0.1:1883", [], out)
    with pytest.raises(ValueError, match="duration"):
        record("mqtt://127.0.0.1:1883", ["a"], out, duration=0)
    with pytest.raises(ValueError, match="protocol"):
        record("mqtt://127.0.0.1:1883", ["a"], out, protocol="4")


def test_writer_counts_what_it_cannot_queue() -> None:
    from fleet.recording.writer import _Line, _Writer

    class Stuck:
        def __init__(self) -> None:
            self.release = threading.Event()
            self.lines: list[bytes] = []

        def write(self, data: bytes) -> int:
            self.release.wait(5)
            self.lines.append(data)
            return len(data)

        def flush(self) -> None:
            pass

    stream = Stuck()
    writer = _Writer(stream, queue_size=2)  # type: ignore[arg-type]
    writer.start()
    line = _Line(encode_message(0.1, "imu/s/window", b"{}"), "imu/s/window", 2)
    offered = [writer.offer(line) for _ in range(6)]
    stream.release.set()
    writer.close()
    stats = writer.snapshot(1.0, 0)
    assert offered.count(False) == stats.dropped >= 3
    assert stats.messages + stats.dropped == 6
    assert len(stream.lines) == stats.messages


# --- bad files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"{not json\n", "is not an imu recording: its first line should be a header"),
        (json_window(0) + b"\n", "is not an imu recording"),
        (b'{"format": "imu-recording", "version": 2, "topics": []}\n', "version 2"),
        (b'{"format": "imu-recording", "version": 1, "topics": "a"}\n', "'topics' must be"),
        (b"\x89PNG\r\n\x1a\n", "is not an imu recording"),
    ],
)
def test_a_file_that_is_not_a_recording_is_refused(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match=expected):
        list(read_recording(path))
    with pytest.raises(RecordingError, match=expected):
        replay(path, "mqtt://127.0.0.1:1")  # refused before any connection attempt


def test_a_corrupt_message_line_names_its_line(tmp_path: Path) -> None:
    header = encode_header(RecordingHeader("2025-01-01T00:00:00Z", "mqtt://h:1883", ["#"]))
    good = encode_message(0.0, "a/b", b'{"v":1}')
    for line, expected in [
        (b'{"t": 1, "topic": "a/b"}', "needs 'payload'"),
        (b'{"t": "x", "topic": "a/b", "payload": {}}', "'t' must be a number"),
        (b'{"t": 1, "payload": {}}', "'topic' must be"),
        (b'{"t": 1, "topic": "a", "payload_b64": "!!"}', "not valid base64"),
        (b"[1]", "expected a JSON object"),
        (b"{oops", "not a recorded message"),
    ]:
        path = tmp_path / "corrupt.jsonl"
        path.write_bytes(header + good + line + b"\n" + good)
        with pytest.raises(RecordingError, match=f"corrupt.jsonl:3: .*{expected}"):
            list(read_recording(path))


def test_a_recording_cut_short_keeps_its_complete_messages(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    header = encode_header(RecordingHeader("2025-01-01T00:00:00Z", "mqtt://h:1883", ["#"]))
    body = b"".join(encode_message(i, "a/b", b'{"v":%d}' % i) for i in range(3))
    (tmp_path / "cut.jsonl").write_bytes(header + body + b'{"t": 3, "topic": "a/b", "payl')
    with caplog.at_level(logging.WARNING):
        assert len(list(read_recording(tmp_path / "cut.jsonl"))) == 3
    assert "partial last line" in caplog.text

    compressed = gzip.compress(header + body * 50)
    (tmp_path / "cut.jsonl.gz").write_bytes(compressed[: len(compressed) - 20])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert 0 < len(list(read_recording(tmp_path / "cut.jsonl.gz"))) < 150
    assert "ends early" in caplog.text


# --- calibration ---------------------------------------------------------------------------


def test_recording_as_calibration_set(recorded: Recorded, caplog: pytest.LogCaptureFixture) -> None:
    expected = [window_array(i) for i in range(WINDOWS)]
    expected.insert(4, window_array(99))  # the binary frame, after 4 JSON windows
    with caplog.at_level(logging.WARNING):
        windows, skipped = recording_windows(recorded.path)
    assert windows.dtype == np.float32
    np.testing.assert_array_equal(windows, np.stack(expected))
    assert len(skipped) == 1
    assert "x has 1 rows" in skipped[0]
    assert "skipped 1 window message" in caplog.text

    calib = load_calibration(recorded.path)
    np.testing.assert_array_equal(calib.windows, np.stack(expected))
    assert calib.source == "session.jsonl"


def test_calibration_refuses_a_recording_of_another_version(tmp_path: Path) -> None:
    path = tmp_path / "future.jsonl"
    path.write_bytes(b'{"format": "imu-recording", "version": 9, "topics": []}\n')
    with pytest.raises(BundleError, match="version 9"):
        load_calibration(path)


def test_calibration_jsonl_gz_and_topic_lines(tmp_path: Path) -> None:
    lines = [orjson.dumps({"topic": "imu/s/window", "payload": orjson.loads(json_window(i))})
             for i in range(12)]  # fmt: skip
    lines.insert(2, orjson.dumps({"topic": "imu/s/samples", "payload": {"seq": 0}}))
    path = tmp_path / "plain.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    calib = load_calibration(path)
    np.testing.assert_array_equal(calib.windows, np.stack([window_array(i) for i in range(12)]))


# --- replay --------------------------------------------------------------------------------


def replay_to_fresh_topics(
    recorded: Recorded, broker: LocalBroker, probe: TimedProbe, **kw: Any
) -> tuple[ReplayStats, list[Received], list[float]]:
    target = unique("replay")
    probe.subscribe(f"imu/{target}/#")
    stats = replay(
        recorded.path, broker.url, rewrite={f"imu/{recorded.sensor}/": f"imu/{target}/"}, **kw
    )
    received = probe.wait_for(f"imu/{target}/#", count=len(recorded.published))
    return stats, received, probe.arrivals[: len(received)]


def recorded_gaps(recorded: Recorded) -> np.ndarray:
    return np.diff([m.t for m in read_recording(recorded.path)])


def test_replay_republishes_the_same_payloads_in_order_on_time(
    recorded: Recorded, broker: LocalBroker, timed_probe: TimedProbe
) -> None:
    progress: list[ReplayStats] = []
    stats, received, arrivals = replay_to_fresh_topics(
        recorded, broker, timed_probe, progress=progress.append
    )
    assert [m.topic.split("/")[2] for m in received] == [
        t.split("/")[2] for t, _ in recorded.published
    ]
    for got, (_, sent) in zip(received, recorded.published, strict=True):
        assert as_json_or_bytes(got.payload) == as_json_or_bytes(sent)
    assert received[5].payload == binary_window(99)
    assert stats.messages == len(recorded.published)
    assert stats.dropped == stats.unacknowledged == 0
    assert stats.loops == 1
    assert progress, "progress was never reported"

    gaps, expected = np.diff(arrivals), recorded_gaps(recorded)
    assert np.abs(gaps - expected).max() < 0.05, (gaps, expected)
    assert abs((arrivals[-1] - arrivals[0]) - expected.sum()) < 0.1


def test_replay_at_twice_the_rate_takes_half_the_time(
    recorded: Recorded, broker: LocalBroker, timed_probe: TimedProbe
) -> None:
    _, _, arrivals = replay_to_fresh_topics(recorded, broker, timed_probe, rate=2.0)
    span, expected = arrivals[-1] - arrivals[0], recorded_gaps(recorded).sum()
    assert abs(span - expected / 2) < 0.1, (span, expected)


@pytest.mark.parametrize("rate", [0.0, float("inf")])
def test_replay_as_fast_as_possible(
    recorded: Recorded, broker: LocalBroker, timed_probe: TimedProbe, rate: float
) -> None:
    stats, received, arrivals = replay_to_fresh_topics(recorded, broker, timed_probe, rate=rate)
    assert stats.messages == len(received) == len(recorded.published)
    assert arrivals[-1] - arrivals[0] < recorded_gaps(recorded).sum() / 4


def test_replay_loops_until_stopped(
    recorded: Recorded, broker: LocalBroker, timed_probe: TimedProbe
) -> None:
    target = unique("loop")
    timed_probe.subscribe(f"imu/{target}/#")
    stop = threading.Event()
    result: list[ReplayStats] = []
    thread = threading.Thread(
        target=lambda: result.append(
            replay(
                recorded.path,
                broker.url,
                rate=0,
                loop=True,
                stop=stop,
                rewrite={f"imu/{recorded.sensor}/": f"imu/{target}/"},
            )
        )
    )
    thread.start()
    timed_probe.wait_for(f"imu/{target}/#", count=3 * len(recorded.published))
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    assert result[0].loops >= 2
    assert result[0].unacknowledged == 0


def test_replay_refuses_bad_arguments(recorded: Recorded) -> None:
    with pytest.raises(ValueError, match="rate"):
        replay(recorded.path, "mqtt://127.0.0.1:1", rate=-1)
    with pytest.raises(ValueError, match="rewrite"):
        replay(recorded.path, "mqtt://127.0.0.1:1", rewrite={"imu/": "imu/+/"})
    assert parse_rewrite("imu/a/=imu/b/") == ("imu/a/", "imu/b/")
    with pytest.raises(ValueError, match="OLD_PREFIX=NEW_PREFIX"):
        parse_rewrite("imu/a/")


def test_recorded_message_is_plain_data() -> None:
    message = RecordedMessage(0.5, "imu/s/window", struct.pack("<f", 1.0))
    assert message.content_type is None
    assert not message.is_json
    assert len(binary_window(0)) == BINARY_WINDOW_BYTES
