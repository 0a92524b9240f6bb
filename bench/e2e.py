"""End-to-end benchmark: windows through mosquitto and a node, next to raw ONNX Runtime.

Usage: `python -m bench.e2e [--rate 200] [--seconds 10] [--burst 4000] [--flood 6000]
[--workers auto|N] [--hidden 32] [--json out.json]`

It starts mosquitto on a free loopback port, runs `imu-node run` on the reference bundle in its
own process (so its peak RSS is its own), and from this process:
  1. raw ONNX Runtime: the same model, batch 1 and 1 thread, windows/s and per-call percentiles;
     plus the dynamic-batch export at batch 8, to show whether batching pays on this CPU;
  2. paced: JSON windows at --rate windows/s for --seconds; end-to-end latency (publish ->
     result received, same clock) p50/p95/p99, and the node's own reported latency;
  3. burst: --burst windows as fast as QoS 1 allows; sustained results/s.
  4. flood: --flood JSON windows over --sensors sensors at QoS 0, as fast as one client sends
     them; results/s and windows lost. Against raw ONNX Runtime at batch 1 with 1 and 2
     intra-op threads and two 1-thread calls at once (one shared session, and two sessions).
`--workers` is the node's `workers` setting; `--hidden` widens the reference TCN (32 channels,
~0.1 ms per window) to approach a real encoder's cost (~1 ms per window at 128-160).
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
from fleet.bundles.builder import build_bundle, normalization_from
from fleet.bundles.calibration import simulated_calibration
from fleet.bundles.reference import build_reference_bundle
from fleet.simulate.imu_signals import calibration_set
from node.local_broker import LocalBroker, wait_for_port
from node.model.reference import (
    DILATIONS,
    KERNEL_SIZE,
    ReferenceWeights,
    build_reference_onnx,
    make_reference_weights,
)
from schemas import topics
from schemas.limits import CHANNELS, LATENT_DIM


def percentiles(values: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p95/p99/max in the values' unit."""
    array = np.asarray(values, dtype=np.float64)
    if not len(array):
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(array.max())}


def wide_reference_bundle(out: Path, hidden: int, seed: int = 7) -> Path:
    """The reference TCN with `hidden` channels per block (same contract, more compute)."""
    if hidden == 32:
        return build_reference_bundle(out)
    rng = np.random.default_rng(seed)
    base = make_reference_weights(seed)
    convs, biases, fan = [], [], CHANNELS
    for i in range(len(DILATIONS)):
        gain = 2.0 if i == 0 else 1.0
        w = rng.standard_normal((hidden, fan, KERNEL_SIZE)) * np.sqrt(gain / (fan * KERNEL_SIZE))
        convs.append(w.astype(np.float32))
        biases.append((rng.standard_normal(hidden) * 0.05).astype(np.float32))
        fan = hidden
    dense = rng.standard_normal((LATENT_DIM, 2 * hidden)) * 0.5 * np.sqrt(1.0 / (2 * hidden))
    weights = ReferenceWeights(
        seed=seed,
        conv_weights=tuple(convs),
        conv_biases=tuple(biases),
        dense_weight=dense.astype(np.float32),
        dense_bias=base.dense_bias,
    )
    onnx_path = out.with_suffix(".onnx")
    onnx_path.write_bytes(build_reference_onnx(weights))
    build_bundle(
        onnx_path=onnx_path,
        name="tcn-bench",
        version="1.0.0",
        out=out,
        normalization=normalization_from(simulated_calibration()),
        description=f"Reference TCN widened to {hidden} channels, for benchmarks",
    )
    return out


def _session(bundle_path: Path, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime session opened as the node's backend opens it."""
    bundle = read_bundle(bundle_path)
    assert bundle.onnx is not None
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(bundle.onnx, options, providers=["CPUExecutionProvider"])


def _normalised(bundle_path: Path, windows: np.ndarray) -> np.ndarray:
    norm = read_bundle(bundle_path).manifest.normalization
    mean, std = np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32)
    return ((windows - mean) / std).astype(np.float32)


def raw_parallel(
    bundle_path: Path, windows: np.ndarray, *, shared: bool, calls: int = 2, seconds: float = 3.0
) -> dict[str, Any]:
    """Windows/s of `calls` threads each running batch-1 calls on a 1-thread session at once:
    one session shared by all (`shared`) or one session per thread."""
    x = _normalised(bundle_path, windows)
    sessions = [_session(bundle_path, 1) for _ in range(1 if shared else calls)]
    name = sessions[0].get_inputs()[0].name
    for session in sessions:
        for i in range(20):
            session.run(None, {name: x[i % len(x)][None]})
    counts = [0] * calls
    go = threading.Barrier(calls + 1)
    end = [0.0]

    def drive(index: int) -> None:
        session = sessions[0 if shared else index]
        go.wait()
        done = 0
        while time.perf_counter() < end[0]:
            session.run(None, {name: x[done % len(x)][None]})
            done += 1
        counts[index] = done

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(calls)]
    for thread in threads:
        thread.start()
    end[0] = time.perf_counter() + seconds
    go.wait()
    for thread in threads:
        thread.join()
    return {"calls": calls, "shared_session": shared, "windows_per_s": sum(counts) / seconds}


def raw_backend(
    bundle_path: Path, windows: np.ndarray, batch: int, threads: int = 1
) -> dict[str, Any]:
    """Windows/s and per-call latency of ONNX Runtime alone on normalised windows."""
    x = _normalised(bundle_path, windows)
    session = _session(bundle_path, threads)
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
    return {
        "batch": batch,
        "threads": threads,
        "windows_per_s": done / elapsed,
        "call_ms": percentiles(calls),
    }


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


def flood_phase(
    url: str, windows: np.ndarray, count: int, *, sensors: int, protocol: str = "5"
) -> dict[str, Any]:
    """`count` windows over `sensors` sensors at QoS 0, as fast as one client sends them."""
    names = [f"bench-flood-{i}" for i in range(sensors)]
    arrived: set[tuple[str, int]] = set()
    last = [0.0]
    cv = threading.Condition()

    def on_message(client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        result = orjson.loads(message.payload)
        with cv:
            arrived.add((result["sensor_id"], result["seq"]))
            last[0] = time.perf_counter()
            cv.notify_all()

    sub = client(url, "bench-sub-flood", protocol)
    sub.on_message = on_message
    sub.subscribe("imu/+/motifs", qos=1)
    time.sleep(0.3)
    pub = client(url, "bench-pub-flood", protocol)
    per_sensor = -(-count // sensors)
    payloads = [
        orjson.dumps({"x": windows[i % len(windows)], "seq": i}, option=orjson.OPT_SERIALIZE_NUMPY)
        for i in range(per_sensor)
    ]
    start = time.perf_counter()
    for i in range(count):
        pub.publish(topics.window(names[i % sensors]), payloads[i // sensors], qos=0)
    sent_s = time.perf_counter() - start
    with cv:  # until all arrived, or nothing new for 3 s
        while len(arrived) < count:
            seen = len(arrived)
            cv.wait(3.0)
            if len(arrived) == seen:
                break
        received, elapsed = len(arrived), last[0] - start
    pub.disconnect()
    sub.disconnect()
    return {
        "sent": count,
        "sensors": sensors,
        "received": received,
        "lost": count - received,
        "send_s": sent_s,
        "windows_per_s": received / elapsed if elapsed > 0 else 0.0,
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
        "--flood",
        type=int,
        default=0,
        help="flood phase windows at QoS 0 (0: skip; first runs lost most windows, see "
        "docs/performance.md)",
    )
    parser.add_argument("--sensors", type=int, default=8, help="flood phase sensors (8)")
    parser.add_argument("--workers", default="auto", help="the node's workers setting (auto)")
    parser.add_argument(
        "--hidden", type=int, default=32, help="TCN channels per block (32: the reference model)"
    )
    parser.add_argument(
        "--mqtt-protocol", choices=sorted(PROTOCOLS), default="5", help="node and bench clients"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    windows, _ = calibration_set(32, seed=11)
    with tempfile.TemporaryDirectory() as tmp, LocalBroker("mosquitto") as broker:
        fixed = wide_reference_bundle(Path(tmp) / "ref.tar", args.hidden)
        dynamic = build_reference_bundle(Path(tmp) / "ref-dyn.tar", batch=None)
        print("raw ONNX Runtime ...", file=sys.stderr)
        raw = raw_backend(fixed, windows, batch=1)
        raw_t2 = raw_backend(fixed, windows, batch=1, threads=2)
        raw_shared = raw_parallel(fixed, windows, shared=True)
        raw_two = raw_parallel(fixed, windows, shared=False)
        raw_b8 = raw_backend(dynamic, windows, batch=8)
        print("starting node ...", file=sys.stderr)
        node = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "run", "--broker", broker.url, "--node-id",
             "bench-node", "--model", str(fixed), "--log-level", "WARNING",
             "--mqtt-protocol", args.mqtt_protocol, "--workers", str(args.workers)],
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
            flood = None
            if args.flood:
                print(f"flood phase: {args.flood} windows at QoS 0 ...", file=sys.stderr)
                flood = flood_phase(
                    broker.url,
                    windows,
                    args.flood,
                    sensors=args.sensors,
                    protocol=args.mqtt_protocol,
                )
            rss_peak = peak_rss_mb(node.pid)
        finally:
            node.terminate()
            node.wait(30)

    report = {
        "raw_onnx_batch1": raw,
        "raw_onnx_batch1_2threads": raw_t2,
        "raw_onnx_2calls_shared_session": raw_shared,
        "raw_onnx_2calls_two_sessions": raw_two,
        "raw_onnx_batch8": raw_b8,
        "paced": paced,
        "burst": burst,
        "flood": flood,
        "workers": args.workers,
        "hidden_channels": args.hidden,
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
    t2, shared, two = (
        r["raw_onnx_batch1_2threads"],
        r["raw_onnx_2calls_shared_session"],
        r["raw_onnx_2calls_two_sessions"],
    )
    print(f"raw ONNX Runtime, batch 1, 2 threads: {t2['windows_per_s']:8.0f} windows/s")
    print(f"raw, two 1-thread calls, 1 session  : {shared['windows_per_s']:8.0f} windows/s")
    print(f"raw, two 1-thread calls, 2 sessions : {two['windows_per_s']:8.0f} windows/s")
    print(
        f"raw ONNX Runtime, batch 8 (dynamic) : {b8['windows_per_s']:8.0f} windows/s   "
        f"(reference model; {b8['windows_per_s'] / raw['windows_per_s']:.2f}x batch 1)"
    )
    print(f"node: workers {r['workers']}, TCN {r['hidden_channels']} channels")
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
    flood = r["flood"]
    if flood is not None:
        rate = flood["windows_per_s"]
        print(
            f"flood {flood['received']}/{flood['sent']} results ({flood['lost']} lost, "
            f"{flood['sensors']} sensors, QoS 0), {rate:7.0f} windows/s = "
            f"{rate / raw['windows_per_s']:.2f}x raw 1 thread, "
            f"{rate / t2['windows_per_s']:.2f}x raw 2 threads, "
            f"{rate / two['windows_per_s']:.2f}x two parallel calls"
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
