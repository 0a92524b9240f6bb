"""End-to-end benchmark: windows through mosquitto and a node, next to raw ONNX Runtime.

Usage: `python -m bench.e2e [--rate 200] [--seconds 10] [--burst 4000] [--json out.json]`

It starts mosquitto on a free loopback port, runs `imu-node run` on the reference bundle in its
own process (so its peak RSS is its own), and from this process:
  1. raw ONNX Runtime: the same model, batch 1 and 1 thread, windows/s and per-call percentiles;
     plus the dynamic-batch export at batch 8, to show whether batching pays on this CPU;
  2. paced: JSON windows at --rate windows/s for --seconds; end-to-end latency (publish ->
     result received, same clock) p50/p95/p99, and the node's own reported latency;
  3. burst: --burst windows as fast as QoS 1 allows; sustained results/s.
Figures are printed as a table and as ratios against the raw backend measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from common.bundle import read_bundle
from fleet.bundles.reference import build_reference_bundle
from fleet.simulate.imu_signals import calibration_set
from node.local_broker import LocalBroker, wait_for_port
from schemas import topics


def percentiles(values: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p95/p99/max in the values' unit."""
    array = np.asarray(values, dtype=np.float64)
    if not len(array):
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(array.max())}


def raw_backend(
    bundle_path: Path, windows: np.ndarray, batch: int, threads: int = 1
) -> dict[str, Any]:
    """Windows/s and per-call latency of ONNX Runtime alone on normalised windows."""
    bundle = read_bundle(bundle_path)
    assert bundle.onnx is not None
    norm = bundle.manifest.normalization
    x = ((windows - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)).astype(
        np.float32
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(bundle.onnx, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for i in range(50):
        session.run(None, {name: x[i % len(x)][None].repeat(batch, 0)})
    calls: list[float] = []
    start = time.perf_counter()
    done = 0
    while time.perf_counter() - start < 3.0:
        i = done % (len(x) - batch)
        t = time.perf_counter()
        session.run(None, {name: x[i : i + batch]})
        calls.append((time.perf_counter() - t) * 1000)
        done += batch
    elapsed = time.perf_counter() - start
    return {"batch": batch, "windows_per_s": done / elapsed, "call_ms": percentiles(calls)}


@dataclass
class Receiver:
    """Records when each result arrives, keyed by seq."""

    arrived: dict[int, float] = field(default_factory=dict)
    node_latency: list[float] = field(default_factory=list)
    cv: threading.Condition = field(default_factory=threading.Condition)

    def on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        result = orjson.loads(message.payload)
        with self.cv:
            self.arrived[result["seq"]] = now
            self.node_latency.append(result["latency_ms"])
            self.cv.notify_all()

    def wait(self, count: int, timeout: float) -> bool:
        with self.cv:
            return self.cv.wait_for(lambda: len(self.arrived) >= count, timeout)


PROTOCOLS = {"5": MQTTProtocolVersion.MQTTv5, "3.1.1": MQTTProtocolVersion.MQTTv311}


def client(url: str, name: str, protocol: str) -> mqtt.Client:
    host, port = url.removeprefix("mqtt://").split(":")
    c = mqtt.Client(CallbackAPIVersion.VERSION2, name, protocol=PROTOCOLS[protocol])
    c.on_socket_open = lambda cl, ud, sock: sock.setsockopt(6, 1, 1)  # TCP_NODELAY
    c.max_inflight_messages_set(200)
    c.max_queued_messages_set(0)
    c.connect(host, int(port))
    c.loop_start()
    return c


def run_phase(
    url: str,
    windows: np.ndarray,
    count: int,
    *,
    rate: float | None,
    sensor: str,
    protocol: str = "5",
    outstanding: int = 64,
) -> dict[str, Any]:
    """Send `count` windows, paced at `rate`/s or (rate None) as fast as the node keeps up.

    Unpaced, at most `outstanding` windows are in flight (sent, result not yet received): the
    closed loop measures sustained throughput instead of overflowing the node's queue.
    """
    receiver = Receiver()
    sub = client(url, f"bench-sub-{sensor}", protocol)
    sub.on_message = receiver.on_message
    sub.subscribe(topics.motifs(sensor), qos=1)
    time.sleep(0.3)
    pub = client(url, f"bench-pub-{sensor}", protocol)
    payloads = [
        orjson.dumps({"x": windows[i % len(windows)], "seq": i}, option=orjson.OPT_SERIALIZE_NUMPY)
        for i in range(count)
    ]
    sent: dict[int, float] = {}
    start = time.perf_counter()
    for i, payload in enumerate(payloads):
        if rate:
            target = start + i / rate
            while (delay := target - time.perf_counter()) > 0:
                time.sleep(min(delay, 0.002))
        if not rate:
            receiver.wait(i - outstanding + 1, timeout=30)
        sent[i] = time.perf_counter()
        pub.publish(topics.window(sensor), payload, qos=1)
    complete = receiver.wait(count, timeout=60 + count / 50)
    elapsed = max(receiver.arrived.values(), default=start) - start
    latencies = [(receiver.arrived[s] - sent[s]) * 1000 for s in receiver.arrived if s in sent]
    pub.disconnect()
    sub.disconnect()
    return {
        "sent": count,
        "received": len(receiver.arrived),
        "complete": complete,
        "windows_per_s": len(receiver.arrived) / elapsed if elapsed > 0 else 0.0,
        "e2e_ms": percentiles(latencies),
        "node_ms": percentiles(receiver.node_latency),
    }


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the report."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=200.0, help="paced phase windows/s (200)")
    parser.add_argument("--seconds", type=float, default=10.0, help="paced phase length (10)")
    parser.add_argument("--burst", type=int, default=4000, help="burst phase windows (4000)")
    parser.add_argument(
        "--outstanding", type=int, default=64, help="burst phase: windows in flight (64)"
    )
    parser.add_argument(
        "--mqtt-protocol", choices=sorted(PROTOCOLS), default="5", help="node and bench clients"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    windows, _ = calibration_set(32, seed=11)
    with tempfile.TemporaryDirectory() as tmp, LocalBroker("mosquitto") as broker:
        fixed = build_reference_bundle(Path(tmp) / "ref.tar")
        dynamic = build_reference_bundle(Path(tmp) / "ref-dyn.tar", batch=None)
        print("raw ONNX Runtime ...", file=sys.stderr)
        raw = raw_backend(fixed, windows, batch=1)
        raw_b8 = raw_backend(dynamic, windows, batch=8)
        print("starting node ...", file=sys.stderr)
        node = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "run", "--broker", broker.url, "--node-id",
             "bench-node", "--model", str(fixed), "--log-level", "WARNING",
             "--mqtt-protocol", args.mqtt_protocol],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        try:
            wait_for_port(broker.port)
            time.sleep(2.0)  # model load, golden check, connect
            rss_idle = peak_rss_mb(node.pid)
            print(
                f"paced phase: {args.rate:g} windows/s for {args.seconds:g} s ...", file=sys.stderr
            )
            count = int(args.rate * args.seconds)
            paced = run_phase(
                broker.url,
                windows,
                count,
                rate=args.rate,
                sensor="bench-paced",
                protocol=args.mqtt_protocol,
            )
            print(f"burst phase: {args.burst} windows ...", file=sys.stderr)
            burst = run_phase(
                broker.url,
                windows,
                args.burst,
                rate=None,
                sensor="bench-burst",
                protocol=args.mqtt_protocol,
                outstanding=args.outstanding,
            )
            rss_peak = peak_rss_mb(node.pid)
        finally:
            node.terminate()
            node.wait(30)

    report = {
        "raw_onnx_batch1": raw,
        "raw_onnx_batch8": raw_b8,
        "paced": paced,
        "burst": burst,
        "node_rss_mb": {"after_start": rss_idle, "peak": rss_peak},
        "cpu_count": os.cpu_count(),
        "mqtt_protocol": args.mqtt_protocol,
    }
    print_report(report, args.rate)
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    return 0


def print_report(r: dict[str, Any], rate: float) -> None:
    """The human-readable table."""
    raw, b8, paced, burst = r["raw_onnx_batch1"], r["raw_onnx_batch8"], r["paced"], r["burst"]
    print(f"\n== end-to-end benchmark ({r['cpu_count']} CPUs, MQTT {r['mqtt_protocol']}) ==")
    print(
        f"raw ONNX Runtime, batch 1, 1 thread : {raw['windows_per_s']:8.0f} windows/s   "
        f"call p50 {raw['call_ms']['p50']:.3f} ms  p99 {raw['call_ms']['p99']:.3f} ms"
    )
    print(
        f"raw ONNX Runtime, batch 8 (dynamic) : {b8['windows_per_s']:8.0f} windows/s   "
        f"({b8['windows_per_s'] / raw['windows_per_s']:.2f}x batch 1)"
    )
    for name, phase in (("paced", paced), ("burst", burst)):
        e2e, own = phase["e2e_ms"], phase["node_ms"]
        print(
            f"{name:<5} {phase['received']}/{phase['sent']} results, "
            f"{phase['windows_per_s']:7.0f} windows/s "
            f"({phase['windows_per_s'] / raw['windows_per_s']:.2f}x raw)"
        )
        print(
            f"      end-to-end ms  p50 {e2e['p50']:7.2f}  p95 {e2e['p95']:7.2f}  "
            f"p99 {e2e['p99']:7.2f}  max {e2e['max']:7.2f}"
        )
        print(
            f"      node-side  ms  p50 {own['p50']:7.2f}  p95 {own['p95']:7.2f}  "
            f"p99 {own['p99']:7.2f}  (p50 {own['p50'] / raw['call_ms']['p50']:.1f}x raw call)"
        )
    print(
        f"node peak RSS: {r['node_rss_mb']['peak']:.0f} MiB "
        f"(after start {r['node_rss_mb']['after_start']:.0f} MiB)"
    )
    print(f"targets: p95 < 50 ms at >= 20 windows/s, < 512 MB -> paced at {rate:g}/s: "
          f"p95 {paced['e2e_ms']['p95']:.1f} ms, burst {burst['windows_per_s']:.0f}/s, "
          f"RSS {r['node_rss_mb']['peak']:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
