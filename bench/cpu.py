"""CPU time per window: the node against the naive peer, ONNX Runtime alone and the floor.

Wall throughput on a 2-core machine mixes the node with the broker and the load generator; CPU
time per window, per process, does not. Each figure is user + system time from /proc of one
process over a closed-loop burst (--windows over --sensors sensors, --outstanding in flight),
divided by the results that came back:
  - ort:   ONNX Runtime alone, batch 1, 1 thread, on normalised windows (in this process);
  - floor: the node's own code with no MQTT: decode, z-score, model, motif head, result encode;
  - peer:  bench/peer.py, the script a user writes first (paho + orjson + ORT in on_message);
  - node:  `imu-node run`, per variant (encoding, results QoS, workers, MQTT version);
and for the MQTT runs, the broker's and the load generator's CPU too. Overhead is a process's
CPU per window minus ORT alone's; the ratio that matters is node overhead / peer overhead.

    python -m bench.cpu                      # JSON and binary, QoS 1, 1 worker, MQTT 5 (~2 min)
    python -m bench.cpu --full               # + QoS 0, 2 workers, MQTT 3.1.1
    python -m bench.cpu --json cpu.json --rounds 3   # interleaved rounds: medians
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil

from bench.e2e_load import ENCODINGS, Encoding, Load, payloads
from bench.e2e_nodes import STANDIN, NodeGroup, NodeSettings
from bench.e2e_raw import BenchModel, reference_model, session
from common.bundle import read_bundle
from fleet.simulate.imu_signals import calibration_set
from node.results import result_message
from node.tools.local_broker import LocalBroker
from node.work import WorkItem
from runtime.backend import BackendOptions
from runtime.pipeline import load_model
from schemas.codec import decode_any_window, encode_dict


@dataclass(frozen=True)
class Variant:
    """One MQTT run: who serves (node or peer) and how."""

    server: str  # "node" or "peer"
    encoding: Encoding
    qos: int = 1
    workers: int = 1
    protocol: str = "5"
    backend: str = "onnx"  # "hailo": the zero-cost Hailo stand-in (the Pi's CPU bill)

    @property
    def name(self) -> str:
        if self.server == "peer":
            return f"peer {self.encoding} mqtt{self.protocol}"
        name = f"node {self.encoding} qos{self.qos} workers{self.workers} mqtt{self.protocol}"
        return name + (" hailo-zero-cost" if self.backend == "hailo" else "")


def cpu_s(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one when None), all its threads."""
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def per_window_us(seconds: float, windows: int) -> float:
    return seconds / windows * 1e6 if windows else float("nan")


def ort_alone(model: BenchModel, windows: np.ndarray, count: int) -> float:
    """CPU us per window of ONNX Runtime alone (batch 1, 1 intra-op thread)."""
    runner = session(model.onnx, threads=1)
    name = runner.get_inputs()[0].name
    inputs = [model.normalised(w)[None] for w in windows]
    for x in inputs[:50]:
        runner.run(None, {name: x})
    start = time.process_time()
    for i in range(count):
        runner.run(None, {name: inputs[i % len(inputs)]})
    return per_window_us(time.process_time() - start, count)


def floor(model: BenchModel, windows: np.ndarray, count: int, encoding: Encoding) -> float:
    """CPU us per window of the node's own code path without MQTT: decode the payload, run the
    model pipeline (z-score, ONNX Runtime, motif head) and encode the result message."""
    pipeline = load_model(read_bundle(model.bundle), "onnx", BackendOptions(threads=1))
    ref = {"name": pipeline.ref.name, "version": pipeline.ref.version}
    bodies = payloads(windows, min(count, 512), encoding)
    try:
        start = time.process_time()
        for i in range(count):
            window = decode_any_window(bodies[i % len(bodies)], None)
            result = pipeline.run(window.x[None])
            item = WorkItem("s", window.seq, window.t0, None, window.x, 0)
            top = int(np.argmax(result.scores[0]))
            encode_dict(result_message(
                item, node_id="n", model=ref, latent=result.latent[0], scores=result.scores[0],
                top=top, latency_ms=0.1,
            ))  # fmt: skip
        return per_window_us(time.process_time() - start, count)
    finally:
        pipeline.close()


class Peer:
    """bench/peer.py as its own process."""

    def __init__(self, broker: str, bundle: Path, protocol: str, log: Path) -> None:
        self.node_id = f"peer-{uuid.uuid4().hex[:6]}"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.peer", "--broker", broker, "--bundle", str(bundle),
                 "--mqtt-protocol", protocol, "--node-id", self.node_id],
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.pid = self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def measure(
    broker: LocalBroker, server_pid: int, windows: np.ndarray, options: argparse.Namespace,
    variant: Variant,
) -> dict[str, Any]:  # fmt: skip
    """One closed-loop burst after a warm-up: CPU us per window of server, broker, generator."""
    prefix = f"cpu{uuid.uuid4().hex[:6]}"
    broker_pid = broker.pid
    assert broker_pid is not None, "the CPU bench needs mosquitto (its own process)"
    with Load(broker.url, prefix, variant.protocol) as load:
        load.run(windows, options.warmup, sensors=options.sensors, encoding=variant.encoding,
                 outstanding=options.outstanding)  # fmt: skip
    prefix = f"cpu{uuid.uuid4().hex[:6]}"
    with Load(broker.url, prefix, variant.protocol) as load:
        before = (cpu_s(server_pid), cpu_s(broker_pid), cpu_s())
        run = load.run(windows, options.windows, sensors=options.sensors,
                       encoding=variant.encoding, outstanding=options.outstanding)  # fmt: skip
        after = (cpu_s(server_pid), cpu_s(broker_pid), cpu_s())
    received = run["received"]
    server, broker_s, generator = (b - a for a, b in zip(before, after, strict=True))
    return {
        "variant": variant.name,
        "received": received,
        "lost": run["lost"],
        "served_by": run["served_by"],
        "windows_per_s": run["windows_per_s"],
        "server_us": per_window_us(server, received),
        "broker_us": per_window_us(broker_s, received),
        "generator_us": per_window_us(generator, received),
    }


def run_variant(
    broker: LocalBroker, model: BenchModel, windows: np.ndarray, options: argparse.Namespace,
    variant: Variant, *, state: Path,
) -> list[dict[str, Any]]:  # fmt: skip
    """Start the server of `variant`, measure --repeat bursts, stop it; the bursts."""
    runs = []
    if variant.server == "peer":
        peer = Peer(broker.url, model.bundle, variant.protocol, state / "peer.log")
        try:
            time.sleep(1.5)  # connected and subscribed (the warm-up burst waits for results)
            runs = [measure(broker, peer.pid, windows, options, variant)
                    for _ in range(options.repeat)]  # fmt: skip
        finally:
            peer.stop()
    else:
        hailo = variant.backend == "hailo"
        # on the stand-in with a zero-cost device: its twin answers repeated windows from memory
        path = os.pathsep.join(filter(None, [str(STANDIN), os.environ.get("PYTHONPATH")]))
        stand_in = (("PYTHONPATH", path), ("HAILO_STANDIN", "zero_cost=1"))
        settings = NodeSettings(
            broker=broker.url, bundle=zero_cost_bundle(model, state) if hailo else model.bundle,
            workers=str(variant.workers), protocol=variant.protocol, state_dir=state,
            extra=("--results-qos", str(variant.qos), "--backend", variant.backend,
                   *options.node_args.split()),
            env=stand_in if hailo else (),
        )  # fmt: skip
        node_id = f"node-{uuid.uuid4().hex[:6]}"
        with NodeGroup(settings, [node_id]) as group:
            group.wait_ready()
            runs = [measure(broker, group.processes[0].pid, windows, options, variant)
                    for _ in range(options.repeat)]  # fmt: skip
    return runs


def zero_cost_bundle(model: BenchModel, state: Path) -> Path:
    """The bench model's bundle with a stand-in HEF (made once per run)."""
    path = state / "hailo-bench.tar"
    if not path.exists():
        sys.path.insert(0, str(STANDIN))
        from hailo_standin.bundles import hailo_bundle  # noqa: PLC0415 (test stand-in)

        hailo_bundle(read_bundle(model.bundle), path, hw_arch="hailo8")
    return path


def summary(variant: Variant, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A variant's row: the median of each figure over all its bursts."""
    figures = {key: statistics.median(r[key] for r in runs)
               for key in ("server_us", "broker_us", "generator_us", "windows_per_s")}  # fmt: skip
    return {"variant": variant.name, "server": variant.server, "encoding": variant.encoding,
            "backend": variant.backend, "lost": sum(r["lost"] for r in runs), "runs": runs,
            **figures}  # fmt: skip


def variants(options: argparse.Namespace) -> list[Variant]:
    chosen: list[Variant] = []
    for encoding in options.encodings:
        chosen.append(Variant("peer", encoding))
        chosen.append(Variant("node", encoding))
        if options.zero_cost_hailo:
            chosen.append(Variant("node", encoding, backend="hailo"))
        if options.full:
            chosen += [
                Variant("node", encoding, qos=0),
                Variant("node", encoding, workers=2),
                Variant("node", encoding, protocol="3.1.1"),
                Variant("peer", encoding, protocol="3.1.1"),
            ]
    return chosen


def report(ort_us: float, floors: dict[str, float], rows: list[dict[str, Any]]) -> None:
    out = sys.stdout.write
    out(f"\nONNX Runtime alone: {ort_us:.0f} us per window (batch 1, 1 thread)\n")
    for encoding, value in floors.items():
        out(f"floor ({encoding}): {value:.0f} us, overhead {value - ort_us:.0f} us\n")
    out(f"\n{'variant':<50}{'server':>8}{'overhead':>10}{'broker':>8}{'generator':>11}"
        f"{'win/s':>8}{'lost':>6}\n")  # fmt: skip
    for row in rows:
        # with the model free (the zero-cost Hailo stand-in) ORT alone is not part of the bill
        overhead = row["server_us"] - ort_us if row["backend"] == "onnx" else float("nan")
        out(f"{row['variant']:<50}{row['server_us']:>8.0f}{overhead:>10.0f}"
            f"{row['broker_us']:>8.0f}{row['generator_us']:>11.0f}{row['windows_per_s']:>8.0f}"
            f"{row['lost']:>6}\n")  # fmt: skip
    for row in rows:
        if row["variant"].endswith("hailo-zero-cost"):
            out(f"{row['variant']}: {row['server_us']:.0f} us per window with the model free: "
                f"one core sustains {1e6 / row['server_us']:.0f} windows/s\n")  # fmt: skip
    out("\nnode overhead / peer overhead (same encoding, MQTT 5, QoS 1, 1 worker):\n")
    for encoding, floor_us in floors.items():
        peer = next((r for r in rows if r["variant"] == f"peer {encoding} mqtt5"), None)
        node = next((r for r in rows
                     if r["variant"] == f"node {encoding} qos1 workers1 mqtt5"), None)  # fmt: skip
        if peer and node:
            ratio = (node["server_us"] - ort_us) / (peer["server_us"] - ort_us)
            out(f"  {encoding}: {ratio:.2f} (node {node['server_us'] - ort_us:.0f} us, "
                f"peer {peer['server_us'] - ort_us:.0f} us, floor "
                f"{floor_us - ort_us:.0f} us)\n")  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.cpu", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    add = p.add_argument
    add("--hidden", type=int, default=192, help="reference TCN channels (192: ~0.7 ms/window)")
    add("--windows", type=int, default=5000, help="windows per measured burst (5000)")
    add("--warmup", type=int, default=500, help="windows before each burst (500)")
    add("--sensors", type=int, default=12, help="sensors sharing the load (12)")
    add("--outstanding", type=int, default=64, help="windows in flight (64)")
    add("--repeat", type=int, default=1, help="bursts per server start (1)")
    add(
        "--rounds",
        type=int,
        default=1,
        help="times the whole variant list runs, interleaved, each server started afresh; "
        "every figure is the median over all bursts (1; 3 or more on a busy machine)",
    )
    add("--encodings", default="json,binary", help="json,binary")
    add("--full", action="store_true", help="also QoS 0, 2 workers and MQTT 3.1.1")
    add(
        "--zero-cost-hailo",
        action="store_true",
        help="also the node on the Hailo stand-in with a zero-cost device: the model costs the "
        "host nothing, so its CPU per window is all a Pi with a Hailo-8 pays",
    )
    add(
        "--node-args",
        default="",
        help="more `imu-node run` options for every node variant (e.g. '--batch-wait-ms 1')",
    )
    add("--json", type=Path, help="write every figure here")
    return p


def main(argv: list[str] | None = None) -> int:
    options = parser().parse_args(argv)
    options.encodings = [e for e in options.encodings.split(",") if e in ENCODINGS]
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-cpu-") as tmp:
        state = Path(tmp)
        model = reference_model(state, options.hidden)
        windows, _ = calibration_set(32, seed=11)
        progress(f"model: {model.description}")
        ort_us = ort_alone(model, windows, options.windows)
        progress(f"ONNX Runtime alone: {ort_us:.0f} us")
        floors = {e: floor(model, windows, options.windows, e) for e in options.encodings}
        progress(f"floor: {', '.join(f'{e} {v:.0f} us' for e, v in floors.items())}")
        chosen = variants(options)
        bursts: dict[Variant, list[dict[str, Any]]] = {variant: [] for variant in chosen}
        with LocalBroker("mosquitto") as broker:
            for round_ in range(1, options.rounds + 1):  # interleaved: drift hits every variant
                for variant in chosen:
                    progress(f"round {round_}/{options.rounds}: {variant.name} ...")
                    bursts[variant] += run_variant(
                        broker, model, windows, options, variant, state=state
                    )
        rows = [summary(variant, runs) for variant, runs in bursts.items()]
        report(ort_us, floors, rows)
        if options.json:
            settings = {key: str(value) for key, value in vars(options).items()}
            document = {"ort_us": ort_us, "floor_us": floors, "rows": rows,
                        "cpu": os.cpu_count(), "options": settings}  # fmt: skip
            options.json.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
