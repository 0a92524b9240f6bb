"""`POST /infer` latency and throughput, next to raw ONNX Runtime in the same run.

Usage: `python -m bench.http [--requests 2000] [--clients 4]`

A node runs in its own process (reference bundle, `--http`), connected to a local mosquitto.
One client sends windows one after another on a keep-alive connection (latency); then several
clients send at once (throughput). Raw ONNX Runtime on the same model, batch 1, is measured
first. The node's numbers include HTTP parsing, JSON decoding, the queue, the worker thread,
normalisation, the motif head and JSON encoding of the answer.
"""

from __future__ import annotations

import argparse
import http.client
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson

from bench.e2e_raw import model_from_path, percentiles, raw_backend
from fleet.bundles.reference import build_reference_bundle
from fleet.simulate.imu_signals import calibration_set
from node.tools.local_broker import LocalBroker, free_port, wait_for_port


def post_windows(
    port: int, bodies: list[bytes], latencies: list[float], failed: list[str] | None = None
) -> None:
    """POST each body in turn on one keep-alive connection; append each answered latency in ms,
    and each failure (a status other than 200, a refused or dropped connection) to `failed`
    (raise on the first one when it is None)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    for body in bodies:
        started = time.perf_counter()
        try:
            connection.request("POST", "/infer", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            problem = None if response.status == 200 else f"HTTP {response.status}"
        except (OSError, http.client.HTTPException) as exc:
            problem = f"{type(exc).__name__}: {exc}"
            connection.close()  # and the next request opens a new one
        if problem is None:
            latencies.append((time.perf_counter() - started) * 1000)
        elif failed is None:
            msg = f"POST /infer failed: {problem}"
            raise RuntimeError(msg)
        else:
            failed.append(problem)
    connection.close()


def wait_healthy(port: int, timeout: float) -> None:
    """Wait until the node's `/healthz` answers 200 (a model serves)."""
    deadline = time.monotonic() + timeout
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/healthz")
            if connection.getresponse().status == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            connection.close()
        if time.monotonic() > deadline:
            msg = f"the node on port {port} did not become healthy in {timeout:g} s"
            raise TimeoutError(msg)
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the comparison."""
    parser = argparse.ArgumentParser(prog="python -m bench.http", description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="per phase (2000)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (4)")
    args = parser.parse_args(argv)
    windows, _ = calibration_set(32, seed=5)
    bodies = [orjson.dumps({"x": windows[i % len(windows)].tolist()}) for i in range(args.requests)]
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp, LocalBroker("mosquitto") as broker:
        bundle = build_reference_bundle(Path(tmp) / "ref.tar")
        model = model_from_path(bundle, Path(tmp))
        raw = raw_backend(model.onnx, model.normalised(np.asarray(windows)), batch=1)
        node = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "node.cli",
                "run",
                "--broker",
                broker.url,
                "--node-id",
                "bench-http",
                "--model",
                str(bundle),
                "--log-level",
                "WARNING",
                "--http",
                f"127.0.0.1:{port}",
            ],
            env={**os.environ, "XDG_STATE_HOME": tmp},
        )
        try:
            wait_for_port(port, 30)  # HTTP answers before the model is loaded:
            wait_healthy(port, 60)  # /healthz is 200 once it serves
            post_windows(port, bodies[:100], [])  # warm up
            serial: list[float] = []
            started = time.perf_counter()
            post_windows(port, bodies, serial)
            serial_rate = len(bodies) / (time.perf_counter() - started)
            parallel: list[float] = []
            failed: list[str] = []
            share = len(bodies) // args.clients
            threads = [
                threading.Thread(
                    target=post_windows,
                    args=(port, bodies[i * share : (i + 1) * share], parallel, failed),
                )
                for i in range(args.clients)
            ]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            parallel_rate = len(parallel) / (time.perf_counter() - started)  # answered ones
        finally:
            node.terminate()
            node.wait(30)

    def line(name: str, ms: dict[str, float], rate: float) -> str:
        return (
            f"{name:<28} p50 {ms['p50']:6.2f}  p95 {ms['p95']:6.2f}  p99 {ms['p99']:6.2f} ms"
            f"   {rate:7.0f} windows/s"
        )

    print(line("raw ONNX Runtime, batch 1", raw["call_ms"], raw["windows_per_s"]))
    print(line("POST /infer, 1 client", percentiles(serial), serial_rate))
    print(line(f"POST /infer, {args.clients} clients", percentiles(parallel), parallel_rate))
    print(f"failed with {args.clients} clients: {len(failed)} of {share * args.clients}"
          + (f" (first: {failed[0]})" if failed else ""))  # fmt: skip
    print(
        f"ratio to raw: 1 client {serial_rate / raw['windows_per_s']:.2f}x, "
        f"{args.clients} clients {parallel_rate / raw['windows_per_s']:.2f}x"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
