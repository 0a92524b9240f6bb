"""Result latency while a node hot-swaps its model, next to its steady-state latency.

Usage: `python -m bench.swap [--rate 200] [--swaps 4]`

A node (its own process) serves a steady stream of windows; the fleet publishes new versions
and points the node at each in turn. Every result's end-to-end latency (publish -> result) is
classed as "during a swap" when it arrived between the node's `downloading` and `active` reports
(plus one second after), and "steady" otherwise. Windows lost or served twice are counted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import paho.mqtt.client as mqtt

from bench.e2e_load import client
from bench.e2e_raw import percentiles
from fleet.bundles.reference import build_reference_bundle
from fleet.desired import desired_for, desired_topic
from fleet.distribution import publish_bundle
from fleet.simulate.imu_signals import calibration_set
from node.tools.local_broker import LocalBroker
from schemas import topics
from schemas.codec import encode

NODE = "bench-swap-node"
SENSOR = "bench-swap"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the comparison."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.swap",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=200.0, help="windows/s (200)")
    parser.add_argument("--swaps", type=int, default=4, help="versions to swap through (4)")
    args = parser.parse_args(argv)
    windows, _ = calibration_set(16, seed=5)
    with tempfile.TemporaryDirectory() as tmp, LocalBroker("mosquitto") as broker:
        folder = Path(tmp)
        base = build_reference_bundle(folder / "v0.tar", version="1.0.0")
        versions = [
            build_reference_bundle(folder / f"v{i}.tar", version=f"1.{i}.0", seed=7 + i)
            for i in range(1, args.swaps + 1)
        ]
        for path in versions:
            publish_bundle(path, broker.url)
        node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "run",
                "--broker",
                broker.url,
                "--node-id",
                NODE,
                "--model",
                str(base),
                "--log-level",
                "WARNING",
            ],
            env={**os.environ, "XDG_CACHE_HOME": str(folder / "cache")},
        )
        try:
            report = measure(broker.url, windows, versions, args.rate)
        finally:
            node.terminate()
            node.wait(30)
    steady, swapping = report["steady"], report["swap"]
    print(f"\n== latency during hot swaps ({args.swaps} swaps at {args.rate:g} windows/s) ==")
    for name, values in (("steady", steady), ("during swap", swapping)):
        p = percentiles(values)
        print(
            f"{name:<12} {len(values):>6} results  p50 {p['p50']:6.2f}  p95 {p['p95']:6.2f}  "
            f"p99 {p['p99']:6.2f}  max {p['max']:6.2f} ms"
        )
    print(
        f"sent {report['sent']}, results {report['received']}, lost {report['lost']}, "
        f"served twice {report['twice']}, swap durations s: {report['durations']}"
    )
    return 0


def measure(url: str, windows: np.ndarray, versions: list[Path], rate: float) -> dict:
    sent: dict[int, float] = {}
    arrived: dict[int, list[float]] = {}
    swap_spans: list[list[float]] = []
    lock = threading.Lock()

    def on_message(c: mqtt.Client, u: object, message: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        body = orjson.loads(message.payload)
        with lock:
            if message.topic.endswith("/motifs"):
                arrived.setdefault(body["seq"], []).append(now)
            elif body["state"] == "downloading":
                swap_spans.append([now, now])
            elif body["state"] == "active" and swap_spans:
                swap_spans[-1][1] = now

    sub = client(url, "bench-swap-sub", "5")
    sub.on_message = on_message
    sub.subscribe([(topics.motifs(SENSOR), 1), (topics.node_model(NODE), 1)])
    pub = client(url, "bench-swap-pub", "5")
    time.sleep(3.0)  # node start-up
    total = int(rate * (4 + 4 * len(versions)))
    payloads = [
        orjson.dumps({"x": windows[i % len(windows)], "seq": i}, option=orjson.OPT_SERIALIZE_NUMPY)
        for i in range(total)
    ]
    swap_at = {int(rate * (3 + 4 * k)): path for k, path in enumerate(versions)}
    start = time.perf_counter()
    for i, payload in enumerate(payloads):
        while (delay := start + i / rate - time.perf_counter()) > 0:
            time.sleep(min(delay, 0.002))
        if i in swap_at:
            desired = desired_for(swap_at[i])
            pub.publish(desired_topic("node", NODE), encode(desired), qos=1, retain=True)
        sent[i] = time.perf_counter()
        pub.publish(topics.window(SENSOR), payload, qos=1)
    time.sleep(3.0)
    pub.publish(desired_topic("node", NODE), b"", qos=1, retain=True)
    with lock:
        spans = [(a, b + 1.0) for a, b in swap_spans]
        steady, swapping = [], []
        for seq, times in arrived.items():
            latency = (times[0] - sent[seq]) * 1000
            during = any(a <= times[0] <= b for a, b in spans)
            (swapping if during else steady).append(latency)
        return {
            "steady": steady,
            "swap": swapping,
            "sent": total,
            "received": len(arrived),
            "lost": total - len(arrived),
            "twice": sum(len(t) > 1 for t in arrived.values()),
            "durations": [round(b - a - 1.0, 2) for a, b in spans],
        }


if __name__ == "__main__":
    raise SystemExit(main())
