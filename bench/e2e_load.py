"""Load for `bench.e2e`: windows published to the broker, results timed as they come back.

Every window goes to `imu/{sensor}/window` as JSON or as a binary frame (docs/topics.md
"Binary frames"), round-robin over a set of sensors; or (`topic="samples"`) each sensor sends
runs of `HOP` samples to `imu/{sensor}/samples`, after a first run that begins its stream, so
that every run completes one window. One subscriber on `imu/+/motifs` records when each
(sensor, seq) result arrives and which node served it, on the publisher's clock.
Sensor ids start with a per-run prefix, so a shared broker's other traffic is ignored.

- `closed_loop`: as fast as the node(s) keep up, at most `outstanding` windows in flight
  (published, result not yet received): sustained throughput without overflowing a queue.
- `paced`: `rate` windows/s, open loop: latency at an offered rate.
- `flood`: QoS 0, as fast as one client publishes, nothing waited for: what survives overload.
"""

from __future__ import annotations

import socket
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.e2e_raw import percentiles
from schemas import topics
from schemas.codec import encode_binary_window

Encoding = Literal["json", "binary"]
ENCODINGS: tuple[Encoding, ...] = ("json", "binary")
PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}
BALANCE = 12  # sensor sets split evenly over 1, 2, 3, 4, 6 or 12 workers (see `sensor_ids`)
HOP = 50
"""Samples per run in `samples` load: the node's default hop, so each run completes a window."""
Topic = Literal["window", "samples"]


def sensor_ids(prefix: str, count: int) -> list[str]:
    """`count` sensor ids that a node's workers share evenly.

    A node pins a sensor to worker `crc32(id) % workers` (node/inference/workers.py): ids are
    picked so that `crc32 % 12` runs through 0..11 in turn, which gives every worker of 1, 2, 3,
    4 or 6 the same number of sensors when `count` is a multiple of 12 (and within one otherwise).
    """
    ids: list[str] = []
    candidate = 0
    for index in range(count):
        want = index % BALANCE
        while zlib.crc32(f"{prefix}-{candidate}".encode()) % BALANCE != want:
            candidate += 1
        ids.append(f"{prefix}-{candidate}")
        candidate += 1
    return ids


def _nodelay(client: mqtt.Client, userdata: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def client(url: str, name: str, protocol: str) -> mqtt.Client:
    """A bench MQTT client: TCP_NODELAY, 200 in flight, started."""
    host, port = url.removeprefix("mqtt://").rsplit(":", 1)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, name, protocol=PROTOCOLS[protocol])
    c.on_socket_open = _nodelay
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.connect(host, int(port))
    c.loop_start()
    return c


def payloads(windows: np.ndarray, count: int, encoding: Encoding) -> list[bytes]:
    """`count` window messages with seq 0..count-1 (the windows repeat)."""
    if encoding == "binary":
        return [encode_binary_window(windows[i % len(windows)], i) for i in range(count)]
    return [
        orjson.dumps({"x": windows[i % len(windows)], "seq": i}, option=orjson.OPT_SERIALIZE_NUMPY)
        for i in range(count)
    ]


@dataclass
class Results:
    """Arrival time, serving node and node-side latency of each result, by (sensor, seq)."""

    prefix: str
    arrived: dict[tuple[str, int], float] = field(default_factory=dict)
    served_by: Counter[str] = field(default_factory=Counter)
    duplicates: int = 0
    node_latency: list[float] = field(default_factory=list)
    last: float = 0.0
    cv: threading.Condition = field(default_factory=threading.Condition)

    def on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        """paho callback (network thread)."""
        now = time.perf_counter()
        result = orjson.loads(message.payload)
        key = (result["sensor_id"], result["seq"])
        if not key[0].startswith(f"{self.prefix}-"):
            return
        with self.cv:
            if key in self.arrived:
                self.duplicates += 1
            else:
                self.arrived[key] = now
            self.served_by[result["node_id"]] += 1
            self.node_latency.append(result["latency_ms"])
            self.last = now
            self.cv.notify_all()

    def wait(self, count: int, timeout: float) -> bool:
        """Until `count` results arrived; False on timeout."""
        with self.cv:
            return self.cv.wait_for(lambda: len(self.arrived) >= count, timeout)

    def settle(self, count: int, quiet: float) -> None:
        """Until `count` results arrived, or none for `quiet` seconds."""
        with self.cv:
            while len(self.arrived) < count:
                seen = len(self.arrived)
                self.cv.wait(quiet)
                if len(self.arrived) == seen:
                    return


class Load:
    """One publisher and one result subscriber on the broker, for one phase."""

    def __init__(self, url: str, prefix: str, protocol: str) -> None:
        """Connect both clients and subscribe to every sensor's results (QoS 1)."""
        self.results = Results(prefix)
        self.prefix = prefix
        self._sub = client(url, f"{prefix}-sub", protocol)
        self._sub.on_message = self.results.on_message
        subscribed = threading.Event()
        self._sub.on_subscribe = lambda *args: subscribed.set()
        self._sub.subscribe(topics.motifs("+"), qos=1)
        if not subscribed.wait(10):
            msg = f"no SUBACK from {url} for the results subscription"
            raise RuntimeError(msg)
        self._pub = client(url, f"{prefix}-pub", protocol)

    def close(self) -> None:
        """Disconnect both clients."""
        self._pub.disconnect()
        self._pub.loop_stop()
        self._sub.disconnect()
        self._sub.loop_stop()

    def __enter__(self) -> Load:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        windows: np.ndarray,
        count: int,
        *,
        sensors: int,
        encoding: Encoding = "json",
        rate: float | None = None,
        outstanding: int = 64,
        qos: int = 1,
        wait_s: float = 3.0,
        topic: Topic = "window",
    ) -> dict[str, Any]:
        """Publish `count` windows over `sensors` sensors: paced at `rate`, or (None) closed-loop
        with `outstanding` in flight, or (`outstanding` 0) a flood; then collect the results
        (until all arrived, or none for `wait_s`). With `topic="samples"`, each window is one
        JSON run of `HOP` samples that completes it."""
        names = sensor_ids(self.prefix, sensors)
        per_sensor = -(-count // sensors)
        if topic == "samples":
            encoding = "json"
            runs = sample_runs(windows, per_sensor + 1)
            for name in names:  # each stream's first run completes no window
                self._pub.publish(topics.samples(name), runs[0], qos=qos)
            bodies = runs[1:]
            keys = [(names[i % sensors], (i // sensors) * HOP) for i in range(count)]
            publish_topic = topics.samples
        else:
            bodies = payloads(windows, per_sensor, encoding)
            keys = [(names[i % sensors], i // sensors) for i in range(count)]
            publish_topic = topics.window
        results = self.results
        sent: list[float] = [0.0] * count
        start = time.perf_counter()
        for i, (sensor, _) in enumerate(keys):
            if rate:
                target = start + i / rate
                while (delay := target - time.perf_counter()) > 0:
                    time.sleep(min(delay, 0.001))
            elif outstanding and i >= outstanding and not results.wait(i - outstanding + 1, 5.0):
                pass  # a lost window: go on, it counts as lost
            sent[i] = time.perf_counter()
            self._pub.publish(publish_topic(sensor), bodies[i // sensors], qos=qos)
        send_s = time.perf_counter() - start
        results.settle(count, wait_s)
        with results.cv:
            arrived = {k: results.arrived[k] for k in keys if k in results.arrived}
            last, own = results.last, list(results.node_latency)
            served, duplicates = dict(results.served_by), results.duplicates
        latencies = [(arrived[k] - sent[i]) * 1000 for i, k in enumerate(keys) if k in arrived]
        elapsed = last - start
        return {
            "topic": topic,
            "encoding": encoding,
            "mode": "paced" if rate else "closed_loop" if outstanding else "flood",
            "offered_per_s": rate,
            "outstanding": None if rate else outstanding,
            "qos": qos,
            "sensors": sensors,
            "sent": count,
            "received": len(arrived),
            "lost": count - len(arrived),
            "duplicates": duplicates,
            "send_s": send_s,
            "windows_per_s": len(arrived) / elapsed if arrived and elapsed > 0 else 0.0,
            "e2e_ms": percentiles(latencies),
            "node_ms": percentiles(own),
            "served_by": served,
        }


def sample_runs(windows: np.ndarray, count: int) -> list[bytes]:
    """`count` consecutive JSON runs of `HOP` samples (seq 0, HOP, 2 HOP, ...), from `windows`."""
    rows = windows.reshape(-1, windows.shape[-1])
    runs = []
    for index in range(count):
        at = (index * HOP) % (len(rows) - HOP)
        body = {"seq": index * HOP, "samples": rows[at : at + HOP].round(5).tolist()}
        runs.append(orjson.dumps(body))
    return runs


def phase(
    url: str,
    prefix: str,
    protocol: str,
    windows: np.ndarray,
    count: int,
    **options: Any,
) -> dict[str, Any]:
    """One phase on fresh clients (and a fresh sensor-id prefix, so seqs start at 0 again)."""
    with Load(url, prefix, protocol) as load:
        return load.run(windows, count, **options)
