"""Simulated IMU sensors publishing to a broker, in real time.

Each sensor has its own seeded `ImuSignalGenerator` (activities change every few seconds). In
`samples` mode a sensor publishes runs of consecutive samples (`seq` = index of the first sample)
every `interval_s`; in `window` mode it publishes a whole 100-sample window every `hop` samples,
as JSON or (`encoding="binary"`) as a headered binary frame with its seq (docs/topics.md, Binary
frames; a frame has no `t0`).
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from fleet.pki.login import client_login
from fleet.simulate.imu_signals import Activity, ImuSignalGenerator
from schemas import topics
from schemas.codec import encode_binary_window, encode_dict
from schemas.limits import BINARY_CONTENT_TYPE, CHANNELS, WINDOW_LENGTH

logger = logging.getLogger(__name__)

SensorMode = Literal["samples", "window"]
WindowEncoding = Literal["json", "binary"]


@dataclass(slots=True)
class _Sensor:
    sensor_id: str
    generator: ImuSignalGenerator
    next_index: int = 0
    pending: np.ndarray | None = None
    """Samples not yet published (window mode keeps the last 100)."""
    since_window: int = 0
    window_seq: int = 0


@dataclass(frozen=True, slots=True)
class SimulatorStats:
    """What the simulator has sent so far."""

    messages: int
    samples: int
    windows: int
    dropped: int
    refused: int = 0
    """Publishes the broker refused (PUBACK >= 128: the ACL, usually a sensor id that is not
    the certificate's)."""

    def __str__(self) -> str:
        return (
            f"{self.messages:,} messages ({self.samples:,} samples, {self.windows:,} windows), "
            f"{self.dropped:,} dropped, {self.refused:,} refused by the broker"
        )


class SensorSimulator:
    """N simulated sensors, paced by the wall clock: on one MQTT connection, or (a secured site,
    `sensor_credentials`) each on its own, logged in with its own certificate."""

    def __init__(
        self,
        broker: str | Connection,
        *,
        sensors: int = 4,
        rate_hz: float = 100.0,
        mode: SensorMode = "samples",
        interval_s: float = 0.1,
        hop: int = 50,
        prefix: str = "sim",
        seed: int | None = None,
        sensor_ids: Sequence[str] = (),
        protocol: Literal["5", "3.1.1"] = "5",
        activity: Activity | None = None,
        encoding: WindowEncoding = "json",
        sensor_credentials: Path | None = None,
    ) -> None:
        if sensors < 1 or rate_hz <= 0 or interval_s <= 0 or not 1 <= hop <= WINDOW_LENGTH:
            msg = "need sensors >= 1, rate_hz > 0, interval_s > 0 and 1 <= hop <= 100"
            raise ValueError(msg)
        if encoding not in ("json", "binary") or (encoding == "binary" and mode != "window"):
            msg = f"encoding {encoding!r}: binary frames are for window mode; samples are JSON"
            raise ValueError(msg)
        self.rate_hz = rate_hz
        self.mode = mode
        self.encoding = encoding
        self.interval_s = interval_s
        self.hop = hop
        ids = list(sensor_ids) or [f"{prefix}-{i:03d}" for i in range(sensors)]
        self._sensors = [
            _Sensor(sensor_id, ImuSignalGenerator(rate_hz, _seed_of(sensor_id, seed, i), activity))
            for i, sensor_id in enumerate(ids)
        ]
        connection = Connection.of(broker, protocol)
        if sensor_credentials is None:
            shared = MqttSession(
                connection.session_settings(f"{ids[0]}-simulator-{time.monotonic_ns() % 10**6}")
            )
            self._sessions = dict.fromkeys(ids, shared)
        else:
            self._sessions = {
                sensor_id: MqttSession(
                    client_login(
                        connection, f"sensor-{sensor_id}", sensor_credentials
                    ).session_settings(f"sensor-{sensor_id}")
                )
                for sensor_id in ids
            }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._messages = self._samples = self._windows = self._dropped = 0

    @property
    def sensor_ids(self) -> list[str]:
        """Ids of the simulated sensors."""
        return [s.sensor_id for s in self._sensors]

    def stats(self) -> SimulatorStats:
        """Counts so far."""
        refused = sum(session.counters.publish_refused for session in self._unique_sessions())
        return SimulatorStats(self._messages, self._samples, self._windows, self._dropped, refused)

    def start(self, connect_timeout: float = 10.0) -> None:
        """Connect and start publishing in a background thread."""
        for session in self._unique_sessions():
            session.connect(connect_timeout)
        self._thread = threading.Thread(target=self._run, name="sensor-simulator", daemon=True)
        self._thread.start()

    def run_for(
        self, seconds: float | None, progress: Callable[[SimulatorStats], None] | None = None
    ) -> None:
        """Publish in the foreground until `seconds` pass (None: until stop())."""
        self.start()
        deadline = None if seconds is None else time.monotonic() + seconds
        while not self._stop.wait(1.0):
            if progress is not None:
                progress(self.stats())
            if deadline is not None and time.monotonic() >= deadline:
                break
        self.stop()

    def stop(self) -> None:
        """Stop publishing, wait for acknowledgements, disconnect."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for session in self._unique_sessions():
            session.wait_published(5)
            session.stop()

    def _unique_sessions(self) -> list[MqttSession]:
        return list({id(session): session for session in self._sessions.values()}.values())

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            due = int((time.monotonic() - start) * self.rate_hz)
            for sensor in self._sensors:
                count = due - sensor.next_index
                if count > 0:
                    self._emit(sensor, sensor.generator.next_samples(count))
            self._stop.wait(self.interval_s)

    def _emit(self, sensor: _Sensor, samples: np.ndarray) -> None:
        t0 = time.time() - (len(samples) - 1) / self.rate_hz
        if self.mode == "samples":
            payload = {
                "seq": sensor.next_index,
                "t0": round(t0, 4),
                "rate_hz": self.rate_hz,
                "samples": samples.round(5),
            }
            self._send(sensor, topics.samples(sensor.sensor_id), encode_dict(payload))
            self._samples += len(samples)
        else:
            self._emit_windows(sensor, samples, t0)
        sensor.next_index += len(samples)

    def _emit_windows(self, sensor: _Sensor, samples: np.ndarray, t0: float) -> None:
        held = sensor.pending if sensor.pending is not None else np.empty((0, CHANNELS), np.float32)
        buffer = np.concatenate([held, samples])
        for i in range(len(samples)):
            sensor.since_window += 1
            end = len(held) + i + 1
            if end >= WINDOW_LENGTH and sensor.since_window >= self.hop:
                sensor.since_window = 0
                first = t0 + (i - WINDOW_LENGTH + 1) / self.rate_hz
                window = buffer[end - WINDOW_LENGTH : end].round(5)
                topic = topics.window(sensor.sensor_id)
                if self.encoding == "binary":
                    frame = encode_binary_window(window, sensor.window_seq)
                    self._send(sensor, topic, frame, content_type=BINARY_CONTENT_TYPE)
                else:
                    payload = {"x": window, "seq": sensor.window_seq, "t0": round(first, 4)}
                    self._send(sensor, topic, encode_dict(payload))
                sensor.window_seq += 1
                self._windows += 1
        sensor.pending = buffer[-(WINDOW_LENGTH - 1) :]

    def _send(
        self, sensor: _Sensor, topic: str, payload: bytes, content_type: str | None = None
    ) -> None:
        """Publish (QoS 1) on the sensor's connection; the content type goes out on MQTT 5
        only."""
        session = self._sessions[sensor.sensor_id]
        if session.publish(topic, payload, qos=1, content_type=content_type):
            self._messages += 1
        else:
            self._dropped += 1


def _seed_of(sensor_id: str, seed: int | None, index: int) -> int:
    """`seed + index` when a seed is given (reproducible runs), else one of the sensor id: two
    simulators never send the same signal."""
    return seed + index if seed is not None else zlib.crc32(sensor_id.encode())
