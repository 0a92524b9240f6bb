"""ONNX Runtime backend on the CPU.

Reads the input/output names and the batch dimension from the model itself. A model with a fixed
batch (the usual export: `[1, 100, 9]`) is run window by window; a dynamic batch runs whole batches
in one call. On a 2-core CPU batching gains little for a small TCN (see docs/performance.md).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from common.bundle import Bundle
from common.errors import ModelContractError
from runtime.backend import (
    BackendInfo,
    BackendKind,
    BackendOptions,
    FloatArray,
    InferenceBackend,
    InferenceOutput,
)
from runtime.errors import BackendError
from schemas.limits import CHANNELS, WINDOW_LENGTH
from schemas.manifest import Outputs


def session_options(threads: int) -> ort.SessionOptions:
    """How the node opens an ONNX Runtime session: `threads` intra-op threads, sequential."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


class OnnxBackend(InferenceBackend):
    """A bundle's `model.onnx` on ONNX Runtime's CPU execution provider."""

    def __init__(self, model: bytes, outputs: Outputs, options: BackendOptions) -> None:
        try:
            self._session = ort.InferenceSession(
                model,
                sess_options=session_options(options.threads),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # ORT raises its own untyped errors
            msg = f"ONNX Runtime cannot load the model: {exc}"
            raise ModelContractError(msg) from exc
        self._threads = options.threads
        self._input, self._batch = self._check_input()
        self._latent = outputs.latent.name
        self._logits = outputs.motif_logits.name if outputs.motif_logits else None
        self._check_outputs([n for n in (self._latent, self._logits) if n])
        self._closed = False
        self._run_options = ort.RunOptions()

    @classmethod
    def from_bundle(cls, bundle: Bundle, options: BackendOptions) -> OnnxBackend:
        """Open a bundle's `model.onnx`."""
        if bundle.onnx is None:
            msg = f"bundle {bundle.ref.name} {bundle.ref.version} has no model.onnx"
            raise ModelContractError(msg)
        return cls(bundle.onnx, bundle.manifest.outputs, options)

    def _check_input(self) -> tuple[str, int | None]:
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            msg = f"model has {len(inputs)} inputs; the contract is one [batch, 100, 9] float32"
            raise ModelContractError(msg)
        spec = inputs[0]
        shape = list(spec.shape)
        if (
            spec.type != "tensor(float)"
            or len(shape) != 3
            or shape[1:] != [WINDOW_LENGTH, CHANNELS]
        ):
            msg = (
                f"model input {spec.name!r} is {spec.type} {shape}; the contract is "
                f"[batch, {WINDOW_LENGTH}, {CHANNELS}] float32"
            )
            raise ModelContractError(msg)
        batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        return spec.name, batch

    def _check_outputs(self, wanted: list[str]) -> None:
        names = {o.name for o in self._session.get_outputs()}
        missing = [n for n in wanted if n not in names]
        if missing:
            msg = f"model has no output named {missing}; it has {sorted(names)}"
            raise ModelContractError(msg)

    def infer(self, windows: FloatArray) -> InferenceOutput:
        """Run (n, 100, 9) normalised windows; chunks to the model's fixed batch if it has one."""
        if self._closed:
            msg = "backend is closed"
            raise BackendError(msg)
        wanted = [self._latent] if self._logits is None else [self._latent, self._logits]
        if self._run_options.terminate:  # a previous call was aborted: start afresh
            self._run_options = ort.RunOptions()
        run_options = self._run_options
        step = self._batch or len(windows)
        parts: list[list[FloatArray]] = []
        for start in range(0, len(windows), step):
            chunk = windows[start : start + step]
            real = len(chunk)
            if real < step:  # pad a short last chunk of a fixed-batch model
                pad = np.zeros((step - real, *chunk.shape[1:]), dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            try:
                outs = self._session.run(wanted, {self._input: chunk}, run_options)
            except Exception as exc:
                msg = f"ONNX Runtime failed on a batch of {real}: {exc}"
                raise BackendError(msg) from exc
            parts.append([np.asarray(o, dtype=np.float32).reshape(step, -1)[:real] for o in outs])
        latent = np.concatenate([p[0] for p in parts])
        logits = np.concatenate([p[1] for p in parts]) if self._logits else None
        return InferenceOutput(latent=latent, motif_logits=logits)

    def describe(self) -> BackendInfo:
        """Name, device and batch limit."""
        return BackendInfo(
            name="onnx",
            device="cpu",
            max_batch=self._batch,
            detail={
                "onnxruntime": ort.__version__,
                "threads": self._threads,
                "input": self._input,
                "batch": self._batch or "dynamic",
            },
        )

    def abort(self) -> None:
        """Terminate a `run` in progress (ONNX Runtime's RunOptions.terminate)."""
        self._run_options.terminate = True

    def close(self) -> None:
        """Drop the session."""
        self._closed = True


def _probe(bundle: Bundle) -> tuple[bool, str]:
    if bundle.onnx is None:
        return False, "the bundle has no model.onnx"
    return True, "ONNX Runtime on the CPU"


KIND = BackendKind(
    name="onnx",
    open=OnnxBackend.from_bundle,
    probe=_probe,
    shares_session=True,  # measured: one session shared by the workers is as fast as one each
    options=("threads",),
)
"""ONNX Runtime's declaration for the registry."""
