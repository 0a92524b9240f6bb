"""Hailo path overhead, measured on the hailo_platform stand-in (tests/hailo_standin).

Usage: `python -m bench.hailo [--windows 512] [--device-ms 0,1] [--queue-sizes 0,4]`

On the stand-in, a "device" call costs what ONNX Runtime costs on the HEF's ONNX twin plus an
optional simulated device time per job. The figures that matter are the differences: what the
node's HailoBackend adds on top of the leanest possible use of the same API (one run_async per
batch, then wait), across batch sizes, frames per job and jobs in flight, and device async queue
sizes (0: what HailoRT derives for the HEF, 32 here; the configured frames and jobs are upper
bounds the backend fits into the queue, shown as the plan it used). On hardware the same host
overhead remains and the device time replaces the stand-in's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.e2e_nodes import STANDIN

sys.path.insert(0, str(STANDIN))

import hailo_platform as hp
from common.bundle import Bundle, read_bundle
from fleet.bundles.reference import build_reference_bundle
from fleet.simulate.imu_signals import calibration_set
from hailo_standin import faults
from hailo_standin.bundles import hailo_bundle
from runtime.backend import BackendOptions
from runtime.hailo_backend import HailoBackend
from runtime.normalize import Normalizer


def per_window_us(run: Any, windows: np.ndarray, batch: int, seconds: float = 1.5) -> float:
    """Mean microseconds per window, running `run(batch_of_windows)` repeatedly."""
    run(windows[:batch])  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for i in range(0, len(windows) - batch + 1, batch):
            run(windows[i : i + batch])
            done += batch
    return (time.perf_counter() - start) / done * 1e6


def minimal_runner(bundle: Bundle) -> tuple[Any, Any]:
    """The leanest correct use of the InferModel API: one run_async per batch, then wait."""
    params = hp.VDevice.create_params()
    params.scheduling_algorithm = hp.HailoSchedulingAlgorithm.ROUND_ROBIN
    vdevice = hp.VDevice(params)
    model = vdevice.create_infer_model(bundle.hef)
    model.input().set_format_type(hp.FormatType.FLOAT32)
    for name in model.output_names:
        model.output(name).set_format_type(hp.FormatType.FLOAT32)
    configured = model.configure()
    in_name, out_name = model.input_names[0], model.output_names[0]
    shape = list(model.input(in_name).shape)
    out_shape = list(model.output(out_name).shape)
    queue = configured.get_async_queue_size()

    def run(batch: np.ndarray) -> None:
        for start in range(0, len(batch), queue):
            chunk = batch[start : start + queue]
            bindings = []
            for window in chunk:
                binding = configured.create_bindings(
                    output_buffers={out_name: np.empty(out_shape, np.float32)}
                )
                binding.input(in_name).set_buffer(np.ascontiguousarray(window.reshape(shape)))
                bindings.append(binding)
            configured.wait_for_async_ready(timeout_ms=5000, frames_count=len(bindings))
            configured.run_async(bindings).wait(5000)

    def close() -> None:
        configured.shutdown()
        vdevice.release()

    return run, close


def main(argv: list[str] | None = None) -> int:
    """Run the measurements and print the table."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.hailo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--windows", type=int, default=512)
    parser.add_argument("--device-ms", default="0,1", help="simulated device time per job")
    parser.add_argument(
        "--queue-sizes", default="0,4", help="device async queue sizes (0: derived from the HEF)"
    )
    args = parser.parse_args(argv)
    raw, _ = calibration_set(args.windows // 6 + 1, seed=3)
    raw = raw[: args.windows]
    with tempfile.TemporaryDirectory() as tmp:
        reference = read_bundle(build_reference_bundle(Path(tmp) / "ref.tar"))
        bundle = hailo_bundle(reference, Path(tmp) / "ref-hailo.tar")
    windows = Normalizer(bundle.manifest.normalization).apply(raw)
    print(
        f"{'device ms/job':>13} {'queue':>5} {'batch':>5} {'asked':>7} {'plan':>7} "
        f"{'minimal us/win':>14} {'backend us/win':>14} {'ratio':>6}"
    )
    for device_ms in (float(v) for v in args.device_ms.split(",")):
        for queue in (int(v) for v in args.queue_sizes.split(",")):
            faults.set_faults(latency_ms=device_ms, async_queue_size=queue)
            for batch in (1, 8, 32):
                run, close = minimal_runner(bundle)
                minimal = per_window_us(run, windows, batch)
                close()
                for frames, jobs in ((1, 1), (8, 1), (8, 4)):
                    options = BackendOptions(frames_per_job=frames, max_jobs=jobs)
                    backend = HailoBackend(bundle, options)
                    plan = backend.plan
                    ours = per_window_us(backend.infer, windows, batch)
                    backend.close()
                    print(
                        f"{device_ms:>13g} {plan.queue_size:>5} {batch:>5} "
                        f"{f'{frames}x{jobs}':>7} {f'{plan.frames_per_job}x{plan.max_jobs}':>7} "
                        f"{minimal:>14.0f} {ours:>14.0f} {ours / minimal:>6.2f}"
                    )
    faults.reset()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
