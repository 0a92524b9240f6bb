"""`InferModel`, `ConfiguredInferModel`, `Bindings` and `AsyncInferJob` of the stand-in.

Mirrors HailoRT 4.23's InferModel API (hailo-notes.md section 1, PY and IMC):
- stream names, per-frame shapes (a list, no batch axis) and quantisation come from the HEF;
  every stream's default user format type is the HEF's (UINT8): call
  `set_format_type(FormatType.FLOAT32)` on the input and every output before `configure()`
  to get floats;
- `configure()` checks the HEF's architecture against the device (a Hailo-8L accepts only
  Hailo-8L HEFs: HailoRTHEFNotCompatibleWithDevice) and that the batch size fits the queue;
- `Bindings` are one frame; `set_buffer` needs a C-contiguous ndarray; sizes are checked at
  `run_async`; `run` is `run_async` + `job.wait` (no `wait_for_async_ready`, as in Python);
- `AsyncInferJob.wait(t)` waits for the job and then its callback, each up to t.
Stand-in limits (NotImplementedError, never silent): UINT16 user formats, format orders other
than the HEF's, NMS outputs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import numpy.typing as npt

from hailo_platform.pyhailort._common import (
    MODULE,
    EdgeNotFound,
    Format,
    FormatOrder,
    FormatType,
    HailoRTException,
    HailoSchedulingAlgorithm,
    QuantInfo,
    UseAfterRelease,
    log,
    status_error,
)
from hailo_platform.pyhailort._engine import (
    MAX_BATCH,
    DeviceContext,
    Edge,
    Job,
    Pipeline,
    Twin,
    derived_queue_size,
)
from hailo_platform.pyhailort._hef import HEF, stream_order, stream_quant
from hailo_standin import faults
from hailo_standin.fake_hef import FakeHef, StreamSpec

ACCEPTS = {"hailo8": {"hailo8", "hailo8r", "hailo8l"}, "hailo8l": {"hailo8l"}}
"""HEF architectures each device accepts (hailo-notes.md section 3, `is_hef_compatible`)."""
PRIORITY_MAX = 31


class InferModel:
    """A HEF loaded for inference on a VDevice (not configured yet)."""

    class InferStream:
        """One input or output edge of the model: name, shape, user format, quantisation."""

        def __init__(self, spec: StreamSpec) -> None:
            self._spec = spec
            self._format = Format(FormatType.UINT8, stream_order(spec))
            self._nms_config_changed = False

        @property
        def name(self) -> str:
            return self._spec.name

        @property
        def shape(self) -> list[int]:
            """Per-frame shape, no batch axis: [H, W, C] for NHWC, [F] for NC."""
            return [int(d) for d in self._spec.shape]

        @property
        def format(self) -> Format:
            return Format(self._format.type, self._format.order, self._format.flags)

        @property
        def quant_infos(self) -> list[QuantInfo]:
            return [stream_quant(self._spec)]

        @property
        def is_nms(self) -> bool:
            return False

        def set_format_type(self, type: FormatType) -> None:
            self._format.type = FormatType(type)

        def set_format_order(self, order: FormatOrder) -> None:
            self._format.order = FormatOrder(order)

        def _set_nms(self, *_: Any) -> None:
            self._nms_config_changed = True  # harmless now, fails configure() (real doc)

        set_nms_score_threshold = _set_nms
        set_nms_iou_threshold = _set_nms
        set_nms_max_proposals_per_class = _set_nms
        set_nms_max_accumulated_mask_size = _set_nms

        def _edge(self) -> Edge:
            kind = FormatType.UINT8 if self._format.type == FormatType.AUTO else self._format.type
            if kind not in (FormatType.UINT8, FormatType.FLOAT32):
                msg = f"hailo_platform stand-in: format type {kind.name} is not implemented"
                raise NotImplementedError(msg)
            if self._format.order not in (FormatOrder.AUTO, stream_order(self._spec)):
                msg = (
                    f"hailo_platform stand-in: converting {self.name} to order "
                    f"{self._format.order.name} is not implemented (HEF order {self._spec.order})"
                )
                raise NotImplementedError(msg)
            if self._nms_config_changed:
                raise status_error(6, f"NMS config was changed for non-NMS edge {self.name}")
            return Edge(self._spec, kind)

    def __init__(self, hef_source: str | bytes, hef: FakeHef, device: DeviceContext) -> None:
        self._hef_source = hef_source
        self._fake = hef
        self._device = device
        self._hef: HEF | None = None
        self._twin: Twin | None = None
        self._batch_size = 0
        self._power_mode: Any = None
        self._inputs = {s.name: self.InferStream(s) for s in hef.inputs}
        self._outputs = {s.name: self.InferStream(s) for s in hef.outputs}

    @property
    def hef(self) -> HEF:
        """A `HEF` built lazily from the same source."""
        if self._hef is None:
            self._hef = HEF(self._hef_source)
        return self._hef

    def set_batch_size(self, batch_size: int) -> None:
        """0 (HAILO_DEFAULT_BATCH_SIZE) lets HailoRT choose; the burst size under a scheduler."""
        self._batch_size = int(batch_size)

    def set_power_mode(self, power_mode: Any) -> None:
        self._power_mode = power_mode

    @property
    def input_names(self) -> list[str]:
        return list(self._inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._outputs)

    @property
    def inputs(self) -> list[InferModel.InferStream]:
        return list(self._inputs.values())

    @property
    def outputs(self) -> list[InferModel.InferStream]:
        return list(self._outputs.values())

    def input(self, name: str = "") -> InferModel.InferStream:
        stream: InferModel.InferStream = _edge(self._inputs, name, "Input")
        return stream

    def output(self, name: str = "") -> InferModel.InferStream:
        stream: InferModel.InferStream = _edge(self._outputs, name, "Output")
        return stream

    def configure(self) -> ConfiguredInferModel:
        """Configure on the device; raises as HailoRT does on an incompatible HEF."""
        if os.getpid() != self._device.pid:
            msg = "ConfiguredInferModel can be created only in the process VDevice was created in."
            raise HailoRTException(msg)
        if self._device.released:
            msg = "the VDevice of this InferModel was released"
            raise UseAfterRelease(msg)
        device_arch = faults.current().arch
        if self._fake.hw_arch not in ACCEPTS[device_arch]:
            raise status_error(
                93,
                f"HEF compiled for {self._fake.hw_arch.upper()} is not compatible with device "
                f"architecture {device_arch.upper()}",
            )
        if self._fake.hw_arch == "hailo8l" and device_arch == "hailo8":
            log.warning("HEF was compiled for Hailo8L; running on Hailo8 gives lower performance")
        if faults.consume("fail_configure"):
            raise status_error(36, "configure: driver ioctl failed (faults.fail_configure)")
        faults.chip_event("reconfigure")
        if self._batch_size > MAX_BATCH:
            raise status_error(2, f"batch size {self._batch_size} is larger than {MAX_BATCH}")
        # the queue is the HEF's (CoreOp::infer_queue_size), unless a test forces another
        forced = faults.current().async_queue_size
        queue_size = forced or derived_queue_size(self._fake, self._batch_size)
        if self._batch_size > queue_size:
            raise status_error(
                6,
                f"Trying to configure a model with a batch={self._batch_size} bigger than "
                f"internal_queue_size={queue_size}, which is not supported.",
            )
        edges = (
            {name: s._edge() for name, s in self._inputs.items()},
            {name: s._edge() for name, s in self._outputs.items()},
        )
        if self._twin is None:
            self._twin = Twin(self._fake)
        pipeline = Pipeline(
            self._fake.network_group,
            self._twin,
            edges,
            quantized=self._fake.quantized,
            queue_size=queue_size,
            device=self._device,
            latency_ms=lambda: faults.current().latency_ms,
        )
        return ConfiguredInferModel(pipeline, self)


def _edge(streams: dict[str, Any], name: str, kind: str) -> Any:
    if name == "" and len(streams) == 1:
        return next(iter(streams.values()))
    if name not in streams:
        detail = f"{kind} {name!r} not found! (edges: {list(streams)})"
        raise status_error(61, detail, cls=EdgeNotFound)
    return streams[name]


class ConfiguredInferModel:
    """An InferModel configured on the device: bindings, async/sync inference, shutdown."""

    class Bindings:
        """One frame's input and output buffers."""

        class InferStream:
            """The buffer of one edge in a Bindings."""

            def __init__(self, name: str) -> None:
                self.name = name
                self._buffer: npt.NDArray[Any] | None = None

            def set_buffer(self, buffer: npt.NDArray[Any]) -> None:
                if not isinstance(buffer, np.ndarray):
                    msg = f"set_buffer(): incompatible function arguments ({type(buffer)})"
                    raise TypeError(msg)
                if not buffer.flags.c_contiguous:
                    msg = "Buffer must be C_CONTIGUOUS"
                    raise HailoRTException(msg)
                self._buffer = buffer

            def get_buffer(self, tf_format: bool | None = False) -> npt.NDArray[Any] | None:
                """The array set; after completion an output holds the result."""
                return self._buffer

        def __init__(self, input_names: list[str], output_names: list[str]) -> None:
            self._inputs = {name: self.InferStream(name) for name in input_names}
            self._outputs = {name: self.InferStream(name) for name in output_names}

        def input(self, name: str = "") -> ConfiguredInferModel.Bindings.InferStream:
            return _edge(self._inputs, name, "Input")  # type: ignore[no-any-return]

        def output(self, name: str = "") -> ConfiguredInferModel.Bindings.InferStream:
            return _edge(self._outputs, name, "Output")  # type: ignore[no-any-return]

        def get(self) -> ConfiguredInferModel.Bindings:
            return self

        def _buffers(self) -> tuple[dict[str, Any], dict[str, Any]]:
            return (
                {name: s.get_buffer() for name, s in self._inputs.items()},
                {name: s.get_buffer() for name, s in self._outputs.items()},
            )

    def __init__(self, pipeline: Pipeline, infer_model: InferModel) -> None:
        self._configured_infer_model: Pipeline | None = pipeline
        self._infer_model = infer_model
        self._input_names = infer_model.input_names
        self._output_names = infer_model.output_names

    def __enter__(self) -> ConfiguredInferModel:
        return self

    def __exit__(self, *args: object) -> None:
        """Drops the reference, like the real one. In CPython the C++ object then dies at once
        and its destructor runs `shutdown()`: jobs still in flight are aborted."""
        pipeline, self._configured_infer_model = self._configured_infer_model, None
        if pipeline is not None:
            pipeline.shutdown()

    def __del__(self) -> None:
        pipeline = getattr(self, "_configured_infer_model", None)
        if pipeline is not None:
            pipeline.shutdown()

    def _live(self) -> Pipeline:
        if self._configured_infer_model is None:
            msg = "'NoneType' object: this ConfiguredInferModel left its `with` block"
            raise UseAfterRelease(msg)
        return self._configured_infer_model

    def activate(self) -> None:
        """Only without the scheduler (HailoSchedulingAlgorithm.NONE)."""
        self._live().activate()

    def deactivate(self) -> None:
        self._live().deactivate()

    def create_bindings(
        self,
        input_buffers: dict[str, npt.NDArray[Any]] | None = None,
        output_buffers: dict[str, npt.NDArray[Any]] | None = None,
    ) -> ConfiguredInferModel.Bindings:
        """One frame's bindings; names must be HEF stream names, not ONNX names."""
        self._live()
        bindings = self.Bindings(self._input_names, self._output_names)
        for name, buffer in (input_buffers or {}).items():
            bindings.input(name).set_buffer(buffer)
        for name, buffer in (output_buffers or {}).items():
            bindings.output(name).set_buffer(buffer)
        return bindings

    def wait_for_async_ready(self, timeout_ms: int = 1000, frames_count: int = 1) -> None:
        """HailoRTTimeout if `frames_count` frames do not fit in the queue within the timeout."""
        self._live().wait_ready(timeout_ms, frames_count)

    def run(self, bindings: list[ConfiguredInferModel.Bindings], timeout: int) -> None:
        """Synchronous: `run_async` then `job.wait(timeout)`."""
        self.run_async(bindings).wait(timeout)

    def run_async(
        self, bindings: list[ConfiguredInferModel.Bindings], callback: Any = None
    ) -> AsyncInferJob:
        """Submit frames (one Bindings each); `callback(completion_info=...)` when done."""
        pipeline = self._live()
        frames = [b._buffers() for b in bindings]
        return AsyncInferJob(pipeline.submit(frames, callback, lambda: faults.consume("timeouts")))

    def _scheduler(self, what: str) -> None:
        if self._live().device.scheduling == HailoSchedulingAlgorithm.NONE:
            raise status_error(6, f"{what} is allowed only when a scheduler is enabled")

    def set_scheduler_timeout(self, timeout_ms: int) -> None:
        self._scheduler("set_scheduler_timeout")

    def set_scheduler_threshold(self, threshold: int) -> None:
        self._scheduler("set_scheduler_threshold")

    def set_scheduler_priority(self, priority: int) -> None:
        self._scheduler("set_scheduler_priority")
        if not 0 <= int(priority) <= PRIORITY_MAX:
            raise status_error(2, f"priority {priority} outside 0..{PRIORITY_MAX}")

    def get_async_queue_size(self) -> int:
        return self._live().queue_size

    def shutdown(self) -> None:
        """Abort in-flight jobs, wait for them, deactivate. The model is unusable after."""
        self._live().shutdown()


class AsyncInferJob:
    """A run_async job."""

    def __init__(self, job: Job) -> None:
        self._job = job

    def wait(self, timeout_ms: int) -> None:
        """Wait for the job, then for its callback, each up to `timeout_ms`; HailoRTTimeout."""
        seconds = max(0.0, timeout_ms / 1000.0)
        if not (self._job.transfers_done.wait(seconds) and self._job.callback_done.wait(seconds)):
            raise status_error(4, f"Waiting for async job to finish has failed ({timeout_ms}ms)")


for _cls in (InferModel, ConfiguredInferModel, AsyncInferJob):
    _cls.__module__ = MODULE
