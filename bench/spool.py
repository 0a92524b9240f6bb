"""What the disk spool costs while the broker is away, and how fast it drains afterwards.

Usage: `python -m bench.spool [--messages 20000]`

Offline: time to keep one real-sized result (a 64-float latent, 12 scores; ~1.6 KB of JSON) in
the spool, next to handing it to paho's in-memory offline queue (the raw alternative) in the
same run. Back online: a local mosquitto, an `Outbox` replaying the spool, and a subscriber
counting arrivals; the drain rate is shown next to publishing the same messages directly.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from common.mqtt.address import BrokerAddress
from common.mqtt.client import SessionSettings
from common.mqtt.session import MqttSession
from node.mqtt.outbox import Outbox
from node.mqtt.spool import Spool
from node.tools.local_broker import LocalBroker
from schemas import SCHEMA_VERSION, topics
from schemas.codec import encode_dict

SENSOR = "bench-spool"


def result(seq: int) -> bytes:
    """A result message of the real size."""
    rng = np.random.default_rng(seq)
    scores = rng.dirichlet(np.ones(12)).astype(np.float32)
    return encode_dict(
        {
            "schema_version": SCHEMA_VERSION,
            "sensor_id": SENSOR,
            "node_id": "bench",
            "seq": seq,
            "model": {"name": "tcn-reference", "version": "1.0.0"},
            "latent": rng.normal(size=64).astype(np.float32),
            "motif_scores": scores,
            "top_motif": int(np.argmax(scores)),
            "latency_ms": 1.234,
            "ts": time.time(),
        }
    )


def session_on(url: str, name: str) -> MqttSession:
    return MqttSession(SessionSettings(address=BrokerAddress.parse(url), client_id=name))


def count_arrivals(url: str, expected: int) -> tuple[mqtt.Client, threading.Event]:
    """A subscriber that sets the event once `expected` results arrived."""
    address = BrokerAddress.parse(url)
    done = threading.Event()
    seen = [0]

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        seen[0] += 1
        if seen[0] >= expected:
            done.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "bench-spool-sub", protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect(address.host, address.port)
    sub.loop_start()
    sub.subscribe(topics.motifs(SENSOR), qos=1)
    time.sleep(0.3)
    return sub, done


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.spool", description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args(argv)
    n = args.messages
    payloads = [result(i) for i in range(n)]
    topic = topics.motifs(SENSOR)
    size = sum(len(p) for p in payloads) / n

    with tempfile.TemporaryDirectory() as folder:
        spool = Spool(Path(folder) / "spool", max_bytes=2**31)
        started = time.perf_counter()
        for payload in payloads:
            spool.append(topic, payload)
        spool_us = (time.perf_counter() - started) / n * 1e6
        offline = session_on("mqtt://127.0.0.1:1", "bench-offline")  # never started: offline
        started = time.perf_counter()
        for payload in payloads:
            offline.publish(topic, payload, qos=1)
        paho_us = (time.perf_counter() - started) / n * 1e6
        on_disk = spool.stats().bytes / 2**20

        with LocalBroker("mosquitto") as broker:
            sub, done = count_arrivals(broker.url, n)
            session = session_on(broker.url, "bench-replay")
            outbox = Outbox(session, spool)
            started = time.perf_counter()
            session.start()
            outbox.start()
            done.wait(300)
            replay_s = time.perf_counter() - started
            outbox.stop()
            session.stop()
            sub.disconnect()

            sub, done = count_arrivals(broker.url, n)
            direct = session_on(broker.url, "bench-direct")
            direct.start()
            direct.wait_connected(10)
            started = time.perf_counter()
            for payload in payloads:
                while direct.pending_publishes() > 200:
                    time.sleep(0.001)
                direct.publish(topic, payload, qos=1)
            done.wait(300)
            direct_s = time.perf_counter() - started
            direct.stop()
            sub.disconnect()

    print(f"{n} results of {size:.0f} bytes; spool on disk {on_disk:.1f} MiB")
    print(
        f"keep one offline:   spool {spool_us:6.1f} us   paho memory {paho_us:6.1f} us"
        f"   ratio {spool_us / paho_us:.2f}x"
    )
    print(
        f"deliver after:      spool replay {n / replay_s:8.0f}/s   direct publish "
        f"{n / direct_s:8.0f}/s   ratio {direct_s / replay_s:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
