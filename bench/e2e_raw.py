"""The model under test for `bench.e2e`, and ONNX Runtime alone on it (the yardstick).

A `BenchModel` is a bundle the node serves plus what raw ONNX Runtime needs to run the same
model: the ONNX bytes, the bundle's normalisation, and (when there is one) a dynamic-batch
export for the batch-8 figure. `--model PATH` takes any ONNX file (wrapped into a bundle by the
fleet's own builder, as `imu-fleet bundle create` does) or a ready bundle (.tar).
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from common.bundle import read_bundle
from fleet.bundles.builder import build_bundle, normalization_from
from fleet.bundles.calibration import simulated_calibration
from fleet.bundles.reference import build_reference_bundle
from runtime.onnx_backend import session_options
from runtime.reference import (
    DILATIONS,
    KERNEL_SIZE,
    ReferenceWeights,
    build_reference_onnx,
    make_reference_weights,
)
from schemas.limits import CHANNELS, LATENT_DIM

FloatArray = np.ndarray[Any, np.dtype[np.float32]]


@dataclass(frozen=True)
class BenchModel:
    """A bundle for the node and the same model for raw ONNX Runtime."""

    bundle: Path
    onnx: bytes
    mean: FloatArray
    std: FloatArray
    description: str
    dynamic_onnx: bytes | None = None  # the same model with a free batch dimension, if known

    def normalised(self, windows: np.ndarray) -> FloatArray:
        """Windows as the node hands them to the backend."""
        return ((windows - self.mean) / self.std).astype(np.float32)


def percentiles(values: list[float] | np.ndarray) -> dict[str, float]:
    """p50/p95/p99/max in the values' unit (NaN when there are none)."""
    array = np.asarray(values, dtype=np.float64)
    if not len(array):
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan"), "max": float("nan")}
    p50, p95, p99 = np.percentile(array, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(array.max())}


def _from_bundle(path: Path, description: str, dynamic_onnx: bytes | None) -> BenchModel:
    bundle = read_bundle(path)
    assert bundle.onnx is not None, f"{path} has no ONNX model"
    norm = bundle.manifest.normalization
    return BenchModel(
        bundle=path,
        onnx=bundle.onnx,
        mean=np.asarray(norm.mean, np.float32),
        std=np.asarray(norm.std, np.float32),
        description=description,
        dynamic_onnx=dynamic_onnx,
    )


def _free_batch(onnx_bytes: bytes) -> bool:
    """Whether the model's first input dimension is not fixed (so batch 8 can be measured)."""
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return not isinstance(session.get_inputs()[0].shape[0], int)


def model_from_path(path: Path, out_dir: Path, normalization: Path | None = None) -> BenchModel:
    """A bundle (.tar) as it is, or any ONNX file wrapped into one by the fleet's builder.

    Without `normalization` (the exporter's model_config.json or a mean/std JSON), mean/std come
    from the simulator's calibration set: right for timing, meaningless for the latents.
    """
    if path.suffix == ".tar":
        bundle = read_bundle(path)
        assert bundle.onnx is not None, f"{path} has no ONNX model"
        dynamic = bundle.onnx if _free_batch(bundle.onnx) else None
        name = f"{bundle.manifest.name} {bundle.manifest.version}"
        return _from_bundle(path, f"bundle {path.name} ({name})", dynamic)
    name = re.sub(r"[^a-z0-9._-]+", "-", path.stem.lower()).strip("-._")[:64] or "bench-model"
    out = out_dir / f"{name}-bench.tar"
    build_bundle(
        onnx_path=path,
        name=name,
        version="0.0.0",
        out=out,
        normalization=normalization or normalization_from(simulated_calibration()),
        description=f"{path.name}, bundled by bench.e2e",
    )
    onnx_bytes = path.read_bytes()
    dynamic = onnx_bytes if _free_batch(onnx_bytes) else None
    return _from_bundle(out, f"{path.name} (bundled here)", dynamic)


def wide_reference_weights(hidden: int, seed: int = 7) -> ReferenceWeights:
    """The reference TCN with `hidden` channels per block (same contract, more compute)."""
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
    return ReferenceWeights(
        seed=seed,
        conv_weights=tuple(convs),
        conv_biases=tuple(biases),
        dense_weight=dense.astype(np.float32),
        dense_bias=base.dense_bias,
    )


def reference_model(out_dir: Path, hidden: int) -> BenchModel:
    """The reference TCN (32 channels) or its widened variant, as a bundle."""
    if hidden == 32:
        path = build_reference_bundle(out_dir / "ref.tar")
        dynamic = build_reference_onnx(make_reference_weights(), batch=None)
        return _from_bundle(path, "reference TCN, 32 channels", dynamic)
    weights = wide_reference_weights(hidden)
    onnx_path = out_dir / f"tcn-{hidden}.onnx"
    onnx_path.write_bytes(build_reference_onnx(weights))
    build_bundle(
        onnx_path=onnx_path,
        name="tcn-bench",
        version="1.0.0",
        out=out_dir / "ref.tar",
        normalization=normalization_from(simulated_calibration()),
        description=f"Reference TCN widened to {hidden} channels, for benchmarks",
    )
    dynamic = build_reference_onnx(weights, batch=None)
    return _from_bundle(out_dir / "ref.tar", f"reference TCN widened to {hidden} channels", dynamic)


def session(onnx: bytes, threads: int) -> ort.InferenceSession:
    """An ONNX Runtime session opened as the node's backend opens it."""
    return ort.InferenceSession(onnx, session_options(threads), providers=["CPUExecutionProvider"])


def raw_backend(
    onnx: bytes, x: FloatArray, *, batch: int = 1, threads: int = 1, seconds: float = 3.0
) -> dict[str, Any]:
    """Windows/s and per-call latency of one session on normalised windows `x`, for `seconds`."""
    sess = session(onnx, threads)
    name = sess.get_inputs()[0].name
    for i in range(20):
        sess.run(None, {name: x[i % len(x)][None].repeat(batch, 0)})
    calls: list[float] = []
    start = time.perf_counter()
    done = 0
    while time.perf_counter() - start < seconds:
        i = done % (len(x) - batch)
        t = time.perf_counter()
        sess.run(None, {name: x[i : i + batch]})
        calls.append((time.perf_counter() - t) * 1000)
        done += batch
    elapsed = time.perf_counter() - start
    return {
        "batch": batch,
        "threads": threads,
        "windows_per_s": done / elapsed,
        "call_ms": percentiles(calls),
    }


def raw_parallel(
    onnx: bytes, x: FloatArray, *, shared: bool, calls: int = 2, seconds: float = 3.0
) -> dict[str, Any]:
    """Windows/s of `calls` threads each running batch-1 calls on a 1-thread session at once:
    one session shared by all (`shared`, as the node's workers do) or one session per thread."""
    sessions = [session(onnx, 1) for _ in range(1 if shared else calls)]
    name = sessions[0].get_inputs()[0].name
    for sess in sessions:
        for i in range(20):
            sess.run(None, {name: x[i % len(x)][None]})
    counts = [0] * calls
    go = threading.Barrier(calls + 1)
    end = [0.0]

    def drive(index: int) -> None:
        sess = sessions[0 if shared else index]
        go.wait()
        done = 0
        while time.perf_counter() < end[0]:
            sess.run(None, {name: x[done % len(x)][None]})
            done += 1
        counts[index] = done

    threads = [
        threading.Thread(target=drive, args=(i,), name=f"bench-raw-{i}") for i in range(calls)
    ]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    end[0] = start + seconds
    go.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return {"calls": calls, "shared_session": shared, "windows_per_s": sum(counts) / elapsed}


def raw_suite(model: BenchModel, windows: np.ndarray, seconds: float) -> dict[str, Any]:
    """Every figure raw ONNX Runtime is measured at, `seconds` each."""
    x = model.normalised(windows)
    suite: dict[str, Any] = {
        "batch1_1thread": raw_backend(model.onnx, x, threads=1, seconds=seconds),
        "batch1_2threads": raw_backend(model.onnx, x, threads=2, seconds=seconds),
        "parallel_2x1thread_shared_session": raw_parallel(
            model.onnx, x, shared=True, seconds=seconds
        ),
        "parallel_2x1thread_two_sessions": raw_parallel(
            model.onnx, x, shared=False, seconds=seconds
        ),
        "batch8_dynamic": None,
    }
    if model.dynamic_onnx is not None:
        suite["batch8_dynamic"] = raw_backend(model.dynamic_onnx, x, batch=8, seconds=seconds)
    return suite


def best_raw(suites: list[dict[str, Any]]) -> dict[str, Any]:
    """The yardsticks over several passes (before and after the node phases, so that a machine
    busy with other work during one pass does not flatter the node): the best batch-1 rate at 1
    or 2 intra-op threads, and the best of two parallel 1-thread calls."""
    intra = max(
        (
            (suite[key]["threads"], suite[key]["windows_per_s"])
            for suite in suites
            for key in ("batch1_1thread", "batch1_2threads")
        ),
        key=lambda pair: float(pair[1]),
    )
    parallel = max(
        suite[key]["windows_per_s"]
        for suite in suites
        for key in ("parallel_2x1thread_shared_session", "parallel_2x1thread_two_sessions")
    )
    return {
        "best_intra_op": {"threads": intra[0], "windows_per_s": intra[1]},
        "best_parallel": {"windows_per_s": parallel},
    }
