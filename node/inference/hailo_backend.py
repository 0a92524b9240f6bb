"""Hailo-8/8L backend on HailoRT's InferModel API (HailoRT 4.18+; written against 4.23).

Everything about the compiled model is read from the HEF at load time: stream names (Hailo's
`<network>/<layer>`, never the ONNX names), per-frame shapes (no batch axis), orders and formats.
Inputs and outputs are switched to FLOAT32 before `configure()` (HailoRT then quantises and
dequantises on the host). A batch becomes a list of single-frame bindings submitted with
`run_async`, at most `max_jobs` jobs in flight, each after `wait_for_async_ready`. Any HailoRT
error inside `run_async` shuts the configured pipeline down (hailo-notes.md section 1), so a failed
batch is retried once on a freshly configured pipeline before it is reported. `close()` shuts the
pipeline down and releases the VDevice explicitly; nothing relies on `__del__`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from node.errors import BackendError, BackendUnavailableError, ModelContractError, NodeError
from node.inference.backend import (
    BackendInfo,
    BackendOptions,
    FloatArray,
    InferenceBackend,
    InferenceOutput,
)
from node.model.bundle import Bundle
from schemas.limits import CHANNELS, LATENT_DIM, MOTIF_COUNT, WINDOW_LENGTH

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install HailoRT 4.x on the Pi (`sudo apt install hailo-all`, then reboot) and create the "
    "venv with --system-site-packages so `import hailo_platform` works (docs/hardware.md)"
)
VDEVICE_GROUP = "imu-node"
"""group_id of every VDevice this process opens (so a swap can hold two models on one chip)."""
# Architectures a device accepts (hailo-notes.md section 3: a Hailo-8 also runs 8L HEFs).
ACCEPTS = {"HAILO8": {"hailo8", "hailo8l"}, "HAILO8L": {"hailo8l"}, "HAILO8_A0": {"hailo8"}}


def import_hailo() -> ModuleType:
    """`hailo_platform`, or BackendUnavailableError saying how to get it."""
    try:
        return importlib.import_module("hailo_platform")
    except ImportError as exc:  # includes its own version-mismatch ImportError
        msg = f"the Hailo backend needs the hailo_platform package ({exc}); {INSTALL_HINT}"
        raise BackendUnavailableError(msg) from exc


def find_devices() -> list[str]:
    """Ids of the Hailo devices present (empty when there is no device or no HailoRT)."""
    try:
        hailo = import_hailo()
        return [str(d) for d in hailo.Device.scan()]
    except Exception:
        return []


@dataclass(slots=True)
class _Job:
    """Completion state of one run_async job, filled by HailoRT's callback thread."""

    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)


class HailoBackend(InferenceBackend):
    """A bundle's `model.hef` on one Hailo device."""

    def __init__(self, bundle: Bundle, options: BackendOptions) -> None:
        if bundle.hef is None or bundle.manifest.hef is None:
            msg = f"bundle {bundle.ref.name} {bundle.ref.version} has no model.hef"
            raise ModelContractError(msg)
        self._hailo = import_hailo()
        self._options = options
        self._hef = bundle.hef
        self._hef_arch = bundle.manifest.hef.hw_arch
        self._lock = threading.Lock()
        self._closed = False
        self._vdevice = self._open_vdevice()
        try:
            self._device = self._identify()
            self._check_arch()
            self._model = self._call(self._vdevice.create_infer_model, self._hef)
            self._input, self._frame_shape = self._read_input()
            self._latent, self._logits = self._read_outputs()
            self._set_formats()
            if options.batch_size:
                self._model.set_batch_size(options.batch_size)
            self._configured = self._call(self._model.configure)
        except BaseException:
            self._release_vdevice()
            raise
        logger.info(
            "Hailo %s (fw %s, serial %s) runs %s; input %s %s",
            self._device.get("architecture"),
            self._device.get("firmware"),
            self._device.get("serial"),
            self._hef_arch,
            self._input,
            self._frame_shape,
        )

    # -- load -------------------------------------------------------------------------------

    def _open_vdevice(self) -> Any:
        params = self._hailo.VDevice.create_params()
        params.scheduling_algorithm = self._hailo.HailoSchedulingAlgorithm.ROUND_ROBIN
        # A hot swap opens the new model while the old one still serves: both VDevices must
        # share the chip, which HailoRT allows within one process for one non-UNIQUE group.
        params.group_id = VDEVICE_GROUP
        try:
            return self._hailo.VDevice(params)
        except Exception as exc:
            text = str(exc)
            if "74" in text or "OUT_OF_PHYSICAL_DEVICES" in text:
                msg = (
                    "the Hailo device is busy: another process holds it (HAILO_OUT_OF_PHYSICAL_"
                    "DEVICES); stop it (`sudo lsof /dev/hailo0`) or run hailort_service"
                )
            elif "not found" in text:
                msg = (
                    f"no Hailo device found ({text}); check `hailortcli scan` and docs/hardware.md"
                )
            else:
                msg = f"cannot open the Hailo device: {text}"
            raise BackendUnavailableError(msg) from exc

    def _identify(self) -> dict[str, str | int | float]:
        devices = self._call(self._vdevice.get_physical_devices)
        if not devices:
            msg = "HailoRT reports no physical device behind the VDevice"
            raise BackendUnavailableError(msg)
        self._physical = devices[0]
        board = self._call(self._physical.control.identify)
        arch = getattr(board.device_architecture, "name", str(board.device_architecture))
        return {
            "architecture": str(arch).upper(),
            "firmware": str(board.firmware_version),
            "serial": str(board.serial_number).strip() or "n/a",
            "board": str(getattr(board, "board_name", "")).strip(),
            "hailort": str(getattr(self._hailo, "__version__", "?")),
        }

    def _check_arch(self) -> None:
        arch = str(self._device["architecture"])
        if self._hef_arch not in ACCEPTS.get(arch, {self._hef_arch}):
            msg = (
                f"the bundle's HEF is compiled for {self._hef_arch} but this device is {arch}; "
                f"compile for it: imu-fleet model compile BUNDLE --hw-arch {arch.lower()}"
            )
            raise ModelContractError(msg)

    def _read_input(self) -> tuple[str, list[int]]:
        names = list(self._model.input_names)
        if len(names) != 1:
            msg = f"HEF has {len(names)} inputs {names}; the contract is one 100 x 9 window"
            raise ModelContractError(msg)
        shape = [int(d) for d in self._model.input(names[0]).shape]
        if int(np.prod(shape)) != WINDOW_LENGTH * CHANNELS:
            msg = f"HEF input {names[0]!r} has per-frame shape {shape}; expected 100 x 9 values"
            raise ModelContractError(msg)
        return names[0], shape

    def _read_outputs(self) -> tuple[tuple[str, list[int]], tuple[str, list[int]] | None]:
        by_size: dict[int, tuple[str, list[int]]] = {}
        for name in self._model.output_names:
            shape = [int(d) for d in self._model.output(name).shape]
            by_size.setdefault(int(np.prod(shape)), (name, shape))
        if LATENT_DIM not in by_size:
            msg = f"HEF has no {LATENT_DIM}-value output; outputs: {list(self._model.output_names)}"
            raise ModelContractError(msg)
        return by_size[LATENT_DIM], by_size.get(MOTIF_COUNT)

    def _set_formats(self) -> None:
        float32 = self._hailo.FormatType.FLOAT32
        self._model.input(self._input).set_format_type(float32)
        for name in self._model.output_names:
            self._model.output(name).set_format_type(float32)

    # -- inference --------------------------------------------------------------------------

    def infer(self, windows: FloatArray) -> InferenceOutput:
        """Run (n, 100, 9) normalised windows; retried once on a fresh pipeline after an error."""
        with self._lock:
            if self._closed:
                msg = "backend is closed"
                raise BackendError(msg)
            try:
                return self._run(windows)
            except BackendError as first:
                logger.warning("Hailo batch failed (%s); reconfiguring and retrying once", first)
                self._reconfigure()
                return self._run(windows)

    def _run(self, windows: FloatArray) -> InferenceOutput:
        frames = np.ascontiguousarray(windows.reshape(len(windows), *self._frame_shape))
        outputs = [(self._latent, np.empty((len(windows), *self._latent[1]), np.float32))]
        if self._logits is not None:
            outputs.append((self._logits, np.empty((len(windows), *self._logits[1]), np.float32)))
        timeout = self._options.timeout_ms
        step = max(1, self._options.frames_per_job)
        jobs: list[tuple[Any, _Job]] = []
        try:
            for start in range(0, len(frames), step):
                bindings = []
                for i in range(start, min(start + step, len(frames))):
                    binding = self._configured.create_bindings(
                        output_buffers={name: buffer[i] for (name, _), buffer in outputs}
                    )
                    binding.input(self._input).set_buffer(frames[i])
                    bindings.append(binding)
                if len(jobs) >= self._options.max_jobs:  # bound the jobs in flight
                    self._wait(*jobs.pop(0), timeout)
                self._configured.wait_for_async_ready(
                    timeout_ms=timeout, frames_count=len(bindings)
                )
                state = _Job()
                job = self._configured.run_async(bindings, functools.partial(_completed, state))
                jobs.append((job, state))
            for job, state in jobs:
                self._wait(job, state, timeout)
        except NodeError:
            raise
        except Exception as exc:
            raise _backend_error(exc) from exc
        latent = outputs[0][1].reshape(len(windows), LATENT_DIM)
        logits = outputs[1][1].reshape(len(windows), MOTIF_COUNT) if len(outputs) > 1 else None
        return InferenceOutput(latent=latent, motif_logits=logits)

    @staticmethod
    def _wait(job: Any, state: _Job, timeout_ms: int) -> None:
        try:
            job.wait(timeout_ms)
        except Exception as exc:
            raise _backend_error(exc) from exc
        if state.error is not None:
            raise _backend_error(state.error)

    def _reconfigure(self) -> None:
        try:
            self._configured.shutdown()
        except Exception:
            logger.debug("shutdown of a failed pipeline raised", exc_info=True)
        self._configured = self._call(self._model.configure)

    # -- reporting and teardown -------------------------------------------------------------

    def temperature(self) -> float | None:
        """Chip temperature in Celsius (sensor ts0), None when it cannot be read."""
        try:
            return float(self._physical.control.get_chip_temperature().ts0_temperature)
        except Exception:
            return None

    def describe(self) -> BackendInfo:
        """Device identity, firmware, HEF input and limits."""
        return BackendInfo(
            name="hailo",
            device=f"{self._device['architecture']} {self._device['serial']}",
            max_batch=None,
            quantized=True,
            detail={
                **self._device,
                "hef_arch": self._hef_arch,
                "input": self._input,
                "input_shape": "x".join(map(str, self._frame_shape)),
                "max_jobs": self._options.max_jobs,
            },
        )

    def close(self) -> None:
        """Shut the pipeline down and release the device (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._configured.shutdown()
            except Exception:
                logger.warning("Hailo pipeline shutdown failed", exc_info=True)
            self._release_vdevice()

    def _release_vdevice(self) -> None:
        try:
            self._vdevice.release()
        except Exception:
            logger.warning("Hailo VDevice release failed", exc_info=True)

    def _call(self, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except Exception as exc:
            raise _backend_error(exc) from exc


def _completed(state: _Job, completion_info: Any = None) -> None:
    """run_async callback (HailoRT's thread): record the outcome, never raise."""
    try:
        state.error = getattr(completion_info, "exception", None)
    except Exception as exc:
        state.error = exc
    finally:
        state.done.set()


def _backend_error(exc: BaseException) -> NodeError:
    """Map a HailoRT exception (Python or raw C++) to our error with a hint."""
    if isinstance(exc, NodeError):
        return exc
    name = type(exc).__name__
    if "HEFNotCompatible" in name or "InvalidHEF" in name:
        return ModelContractError(f"the HEF does not fit this device: {exc}")
    if name == "HailoRTTimeout":
        return BackendError(
            f"Hailo device timed out ({exc}); check `hailortcli fw-control identify`"
        )
    return BackendError(f"HailoRT error {name}: {exc}")
