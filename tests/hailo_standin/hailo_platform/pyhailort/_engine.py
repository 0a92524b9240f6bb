"""The stand-in "device": one configured model's async pipeline, running the HEF's ONNX twin.

Mirrors what libhailort does under `ConfiguredInferModel` (hailo-notes.md section 1; IMC
`ConfiguredInferModelImpl`): `run_async` validates every binding's byte size against the frame
size of the user format (float32 = 4 bytes per value, uint8 = 1) and any error inside it shuts
the pipeline down; the async queue holds `queue_size` frames (HAILO_QUEUE_IS_FULL past it);
jobs complete in order on one worker thread per configured model, which also runs the user
callbacks (as the binding's callback thread does) with the keyword `completion_info`;
`shutdown()` aborts, waits for in-flight jobs (they complete with HailoRTStreamAborted), then
deactivates. Outputs of a quantised HEF pass through uint8 with each stream's qp_scale/qp_zp,
so they match ONNX Runtime only to within one quantisation step. Nothing here is random.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from hailo_platform.pyhailort._common import (
    MODULE,
    FormatType,
    HailoRTException,
    HailoSchedulingAlgorithm,
    log,
    status_error,
)
from hailo_standin import faults
from hailo_standin.fake_hef import FakeHef, StreamSpec

ZERO_COST_MEMORY = 4096
"""`zero_cost`: how many distinct inputs the twin remembers outputs for."""

PIPELINE_TIMEOUT_S = 10.0
"""HailoRT's pipeline timeout (DEFAULT_VSTREAM_TIMEOUT_MS): when a hung frame is given up."""
SHUTDOWN_WAIT_S = 10.0
"""WAIT_FOR_ASYNC_IN_DTOR_TIMEOUT: how long shutdown() waits for in-flight jobs."""
DTYPES: dict[FormatType, np.dtype[Any]] = {
    FormatType.UINT8: np.dtype(np.uint8),
    FormatType.FLOAT32: np.dtype(np.float32),
}

Buffers = dict[str, "npt.NDArray[Any] | None"]


@dataclass
class DeviceContext:
    """What the configured models of one VDevice share: the chip, its scheduler, its owner."""

    scheduling: HailoSchedulingAlgorithm
    pid: int
    device_lock: threading.Lock = field(default_factory=threading.Lock)
    released: bool = False
    active: Any = None
    """The activated pipeline when scheduling is NONE (one network group at a time)."""
    pipelines: weakref.WeakSet[Pipeline] = field(default_factory=weakref.WeakSet)


@dataclass(frozen=True)
class Edge:
    """One stream as configured: the HEF spec and the user buffer format type."""

    spec: StreamSpec
    type: FormatType

    @property
    def dtype(self) -> np.dtype[Any]:
        return DTYPES[self.type]

    @property
    def frame_size(self) -> int:
        return math.prod(self.spec.shape) * self.dtype.itemsize


class Twin:
    """The HEF's ONNX twin in onnxruntime (one session, shared by a model's pipelines)."""

    def __init__(self, hef: FakeHef) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                hef.onnx, options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise status_error(26, f"HEF body is not a runnable network: {exc}") from exc
        inputs = {i.name: list(i.shape) for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        self.inputs = {s.name: self._pick(s, list(inputs), "input") for s in hef.inputs}
        self.outputs = {s.name: self._pick(s, outputs, "output") for s in hef.outputs}
        self.shapes = {name: inputs[onnx] for name, onnx in self.inputs.items()}
        self._remembered: dict[bytes, list[Any]] = {}
        """`zero_cost`: the outputs of each input run so far (bounded)."""

    @staticmethod
    def _pick(spec: StreamSpec, names: list[str], kind: str) -> str:
        if spec.onnx_name in names:
            return spec.onnx_name
        if not spec.onnx_name and len(names) == 1:
            return names[0]
        raise status_error(26, f"HEF {kind} {spec.name} maps to no ONNX {kind} ({names})")

    def run(self, feeds: dict[str, npt.NDArray[np.float32]], n: int) -> dict[str, Any]:
        """Per stream name (n, values) in, per output stream (n, values) out."""
        batch = next(iter(self.shapes.values()))[0]
        chunk = batch if isinstance(batch, int) and batch > 0 else n
        results: dict[str, list[Any]] = {name: [] for name in self.outputs}
        for start in range(0, n, chunk):
            count = min(chunk, n - start)
            onnx_feeds = {}
            for name, values in feeds.items():
                part = values[start : start + count]
                if count < chunk:  # a fixed ONNX batch: pad with zeros, drop the padding
                    part = np.concatenate([part, np.zeros((chunk - count, part.shape[1]))])
                tail = [d if isinstance(d, int) else -1 for d in self.shapes[name][1:]]
                onnx_feeds[self.inputs[name]] = part.astype(np.float32).reshape(chunk, *tail)
            got = self._run(onnx_feeds)
            for name, array in zip(self.outputs, got, strict=True):
                results[name].append(np.asarray(array).reshape(chunk, -1)[:count])
        return {name: np.concatenate(parts) for name, parts in results.items()}

    def _run(self, onnx_feeds: dict[str, npt.NDArray[np.float32]]) -> list[Any]:
        if not faults.current().zero_cost:
            return list(self.session.run(list(self.outputs.values()), onnx_feeds))
        key = b"".join(feed.tobytes() for feed in onnx_feeds.values())
        got = self._remembered.get(key)
        if got is None:
            got = list(self.session.run(list(self.outputs.values()), onnx_feeds))
            if len(self._remembered) < ZERO_COST_MEMORY:
                self._remembered[key] = got
        return got


class AsyncInferCompletionInfo:
    """What a run_async callback gets as `completion_info`: `.exception` is None or an error."""

    def __init__(self, exception: HailoRTException | None) -> None:
        self.exception = exception


AsyncInferCompletionInfo.__module__ = MODULE


@dataclass(eq=False)
class Job:
    """One run_async call: its frames (input and output buffers per frame) and completion."""

    frames: list[tuple[Buffers, Buffers]]
    callback: Callable[..., Any] | None
    hang: bool
    transfers_done: threading.Event = field(default_factory=threading.Event)
    callback_done: threading.Event = field(default_factory=threading.Event)
    error: HailoRTException | None = None


class Pipeline:
    """A configured model's async pipeline on the stand-in device."""

    def __init__(
        self,
        name: str,
        twin: Twin,
        edges: tuple[dict[str, Edge], dict[str, Edge]],
        *,
        quantized: bool,
        queue_size: int,
        device: DeviceContext,
        latency_ms: Callable[[], float],
    ) -> None:
        self.name = name
        self.twin = twin
        self.inputs, self.outputs = edges
        self.quantized = quantized
        self.queue_size = queue_size
        self.device = device
        self.latency_ms = latency_ms
        self.shut_down = False
        self.active = False
        self._cond = threading.Condition()
        self._abort = threading.Event()
        self._queue: deque[Job] = deque()
        self._in_flight = 0
        self._thread = threading.Thread(target=self._work, name=f"hailort-{name}", daemon=True)
        self._thread.start()
        device.pipelines.add(self)

    # -- submission (the user's thread) ---------------------------------------------------

    def submit(
        self, frames: list[tuple[Buffers, Buffers]], callback: Any, hang: Callable[[], bool]
    ) -> Job:
        """Queue one job; any error shuts the pipeline down first (IMC run_async).

        `hang()` is asked once the job is accepted: True makes it a frame the device never
        returns (faults.timeouts)."""
        try:
            for inputs, outputs in frames:
                self._validate(inputs, self.inputs, "input")
                self._validate(outputs, self.outputs, "output")
            with self._cond:
                if self.shut_down:
                    raise status_error(63, f"pipeline of {self.name} was shut down")
                if self.device.scheduling == HailoSchedulingAlgorithm.NONE and not self.active:
                    raise status_error(69, f"{self.name} is not activated (scheduler is NONE)")
                if self._in_flight + len(frames) > self.queue_size:
                    raise status_error(82, f"async queue of {self.queue_size} frames is full")
                job = Job(frames, callback, hang())
                self._queue.append(job)
                self._in_flight += len(frames)
                self._cond.notify_all()
                return job
        except HailoRTException:
            self.shutdown()
            raise

    @staticmethod
    def _validate(buffers: Buffers, edges: dict[str, Edge], kind: str) -> None:
        for name, edge in edges.items():
            buffer = buffers.get(name)
            if buffer is None:
                raise status_error(61, f"Couldnt find {kind} buffer for '{name}'")
            if buffer.nbytes != edge.frame_size:
                raise status_error(
                    6,
                    f"{kind.capitalize()} buffer size {buffer.nbytes} is different than "
                    f"expected {edge.frame_size} for {kind} '{name}'",
                )

    def wait_ready(self, timeout_ms: float, frames_count: int) -> None:
        """Block until `frames_count` more frames fit in the async queue (IMC)."""
        with self._cond:
            ready = self._cond.wait_for(
                lambda: self.shut_down or self._in_flight + frames_count <= self.queue_size,
                max(0.0, timeout_ms / 1000.0),
            )
            if self.shut_down:
                raise status_error(63, f"pipeline of {self.name} was shut down")
            if not ready:
                edge = next(iter(self.inputs))
                raise status_error(
                    4,
                    f"Got timeout in `wait_for_async_ready` ({timeout_ms}ms) - the edge "
                    f"'{edge}' could not receive {frames_count} transfer-requests",
                )

    def shutdown(self) -> None:
        """Abort, wait for in-flight jobs (up to 10 s), then deactivate (IMC shutdown)."""
        with self._cond:
            self.shut_down = True
            self._abort.set()
            self._cond.notify_all()
            if threading.current_thread() is not self._thread:
                self._cond.wait_for(lambda: self._in_flight == 0, SHUTDOWN_WAIT_S)
        self.deactivate()

    def activate(self) -> None:
        if self.device.scheduling != HailoSchedulingAlgorithm.NONE:
            raise status_error(6, "Manually activating a core-op is not allowed under a scheduler")
        with self._cond:
            other = self.device.active
            if self.active or (other is not None and other is not self and other.active):
                raise status_error(6, "a network group is already activated on this device")
            self.active = True
            self.device.active = self

    def deactivate(self) -> None:
        self.active = False
        if self.device.active is self:
            self.device.active = None

    # -- the device (worker thread) -----------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self.shut_down)
                if not self._queue:
                    return
                job = self._queue.popleft()
            job.error = self._process(job)
            job.transfers_done.set()
            self._complete(job)

    def _aborted(self) -> HailoRTException:
        return status_error(63, f"job on {self.name} aborted by shutdown")

    def _process(self, job: Job) -> HailoRTException | None:
        if self._abort.is_set():
            return self._aborted()
        if job.hang or faults.chip_hung():  # frames the device never returns
            if self._abort.wait(PIPELINE_TIMEOUT_S):
                return self._aborted()
            return status_error(4, f"{self.name}: frame not returned by the device")
        with self.device.device_lock:
            latency = self.latency_ms() / 1000.0
            if latency > 0 and self._abort.wait(latency):
                return self._aborted()
            try:
                self._infer(job)
            except Exception as exc:
                log.exception("inference on the stand-in device failed")
                return status_error(8, f"inference failed: {exc}")
        faults.frames_returned(len(job.frames))
        return None

    def _infer(self, job: Job) -> None:
        n = len(job.frames)
        if n == 0:
            return
        feeds = {}
        for name, edge in self.inputs.items():
            raw = np.stack([_bytes(inputs[name]) for inputs, _ in job.frames])
            values = raw.view(edge.dtype).astype(np.float32)
            if edge.type == FormatType.UINT8:  # the host dequantises uint8 user data
                values = (values - np.float32(edge.spec.qp_zp)) * np.float32(edge.spec.qp_scale)
            feeds[name] = values
        results = self.twin.run(feeds, n)
        for name, edge in self.outputs.items():
            values = results[name].astype(np.float32)
            if values.shape[1] != math.prod(edge.spec.shape):
                msg = f"ONNX output for {name} has {values.shape[1]} values, HEF {edge.spec.shape}"
                raise ValueError(msg)
            if self.quantized or edge.type == FormatType.UINT8:
                scale, zp = np.float32(edge.spec.qp_scale), np.float32(edge.spec.qp_zp)
                q = np.clip(np.rint(values / scale + zp), 0, 255)
                values = q.astype(np.uint8) if edge.type == FormatType.UINT8 else (q - zp) * scale
            values = np.ascontiguousarray(values, dtype=edge.dtype)
            for i, (_, outputs) in enumerate(job.frames):
                _bytes(outputs[name])[:] = values[i].view(np.uint8)

    def _complete(self, job: Job) -> None:
        try:
            if job.callback is not None:
                job.callback(completion_info=AsyncInferCompletionInfo(job.error))
        except Exception as exc:
            # Real HailoRT calls the callback from a C++ thread without a catch: the process
            # would very likely std::terminate (hailo-notes.md section 1). Report it loudly.
            log.critical("run_async callback raised; real HailoRT would abort the process")
            threading.excepthook(
                threading.ExceptHookArgs((type(exc), exc, exc.__traceback__, self._thread))
            )
        finally:
            job.callback_done.set()
            with self._cond:
                self._in_flight -= len(job.frames)
                self._cond.notify_all()


def _bytes(array: npt.NDArray[Any] | None) -> npt.NDArray[np.uint8]:
    """The raw bytes of a C-contiguous buffer, as libhailort sees its memory."""
    assert array is not None
    return array.reshape(-1).view(np.uint8)


QUEUE_BYTES = 32 * 2**20
"""HailoRT sizes each stream's queue to hold about 32 MiB of transfers (ResourcesManager::
calc_default_queue_size, v4.23.0)."""
MAX_ACTIVE_TRANSFERS_SCALE = 32
"""The queue's ceiling for small frames: 32 in a plain libhailort build, 8 in one built for
hailort_service (HAILO_BUILD_SERVICE): `faults.async_queue_size=8` models the latter."""
MAX_BATCH = 63
"""A batch must fit the driver's 128-descriptor ring twice over (configure: INVALID_ARGUMENT)."""


def derived_queue_size(hef: FakeHef, batch_size: int) -> int:
    """What `get_async_queue_size()` reports for this HEF on one chip (CoreOp::infer_queue_size):
    the smallest stream queue, each clamp(32 MiB / frame bytes, 2 * batch, max(2 * batch, 32)),
    counted in frames. A tiny model gets 32; only frames of megabytes make it small."""
    batch = max(1, batch_size)
    sizes = []
    for spec in (*hef.inputs, *hef.outputs):
        frame_bytes = max(1, math.prod(spec.shape))  # the device's own uint8 frames
        floor, ceiling = 2 * batch, max(2 * batch, MAX_ACTIVE_TRANSFERS_SCALE)
        sizes.append(min(max(QUEUE_BYTES // frame_bytes, floor), ceiling))
    return min(sizes)
