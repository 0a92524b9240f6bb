"""Hailo-8/8L backend on HailoRT's InferModel API (HailoRT 4.18+; written against 4.23).

Everything about the compiled model is read from the HEF at load time: stream names (Hailo's
`<network>/<layer>`, never the ONNX names), per-frame shapes (no batch axis), orders and formats.
Inputs and outputs are switched to FLOAT32 before `configure()` (HailoRT then quantises and
dequantises on the host). A batch becomes a list of single-frame bindings submitted with
`run_async`, each after `wait_for_async_ready`.

How many frames go in one job and how many jobs are in flight is asked of the device, never
assumed: after `configure()` the backend reads `get_async_queue_size()` (the smallest queue of the
model's streams, which depends on the model and the board) and derives an `AsyncPlan` whose
frames per job times jobs in flight fit that queue; the configured values are upper bounds.
`wait_for_async_ready` for more frames than the queue holds can never succeed in HailoRT.

Any HailoRT error inside `run_async` shuts the configured pipeline down (hailo-notes.md section 1),
so a failed batch is retried once on a freshly configured pipeline before it is reported; what
is left after that (a device that stays hung) is the node's recovery's job (node/inference/
recovery.py), which rebuilds the backend or falls back. `abort()` shuts the pipeline down from
another thread so that a call stuck on the device returns. `close()` shuts the pipeline down and
releases the VDevice explicitly; nothing relies on `__del__`.
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from common.bundle import Bundle
from common.errors import EdgeError, ModelContractError
from runtime.backend import (
    BackendInfo,
    BackendKind,
    BackendOptions,
    FloatArray,
    InferenceBackend,
    InferenceOutput,
)
from runtime.errors import BackendError, BackendUnavailableError
from schemas.limits import CHANNELS, LATENT_DIM, MOTIF_COUNT, WINDOW_LENGTH

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install HailoRT 4.x on the Pi (`sudo apt install hailo-all`, then reboot) and create the "
    "venv with --system-site-packages so `import hailo_platform` works (docs/hardware.md)"
)
CLOSE_WAIT_S = 2.0
"""close(): how long to wait for a call in progress before aborting it, and again after."""
VDEVICE_GROUP = "imu-node"
"""group_id of every VDevice this process opens (so a swap can hold two models on one chip)."""
TIMEOUT = 4
OUT_OF_PHYSICAL_DEVICES = 74
_STATUS = re.compile(r"failed with error: (\d+)")
# Architectures a device accepts (hailo-notes.md section 3: a Hailo-8 also runs 8L HEFs).
ACCEPTS = {"HAILO8": {"hailo8", "hailo8l"}, "HAILO8L": {"hailo8l"}, "HAILO8_A0": {"hailo8"}}


def import_hailo() -> ModuleType:
    """`hailo_platform`, or BackendUnavailableError saying how to get it."""
    try:
        return importlib.import_module("hailo_platform")
    except Exception as exc:  # ImportError (also its version check) or MissingPyHRTLib
        msg = f"the Hailo backend needs the hailo_platform package ({exc}); {INSTALL_HINT}"
        raise BackendUnavailableError(msg) from exc


def find_devices() -> list[str]:
    """Ids of the Hailo devices present (empty when there is no device or no HailoRT)."""
    try:
        hailo = import_hailo()
        return [str(d) for d in hailo.Device.scan()]
    except Exception:
        return []


@dataclass(frozen=True, slots=True)
class AsyncPlan:
    """How batches are cut into async jobs on one configured model."""

    queue_size: int
    """Frames the device's async queue holds (`get_async_queue_size()`)."""
    frames_per_job: int
    max_jobs: int
    """Jobs in flight at once; frames_per_job * max_jobs <= queue_size."""

    @classmethod
    def fit(cls, queue_size: int, frames_per_job: int, max_jobs: int) -> AsyncPlan:
        """The largest plan within the configured bounds that the device's queue holds."""
        if queue_size < 1:
            msg = f"the device reports an async queue of {queue_size} frames; nothing can run"
            raise BackendError(msg)
        frames = max(1, min(frames_per_job, queue_size))
        jobs = max(1, min(max_jobs, queue_size // frames))
        return cls(queue_size, frames, jobs)


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
        self._aborted = False
        self._vdevice = self._open_vdevice()
        try:
            self._device = self._identify()
            self._check_arch()
            self._model = self._call(self._vdevice.create_infer_model, self._hef)
            self._input, self._frame_shape = self._read_input()
            self._latent, self._logits = self._read_outputs()
            self._set_formats()
            self._batch_size = options.batch_size
            self._configured = self._configure()
            self._plan = self._read_plan()
        except BaseException:
            self._release_vdevice()
            raise
        logger.info(
            "Hailo %s (fw %s, serial %s) runs %s; input %s %s; async queue %d frames: "
            "%d frames per job, %d jobs in flight (configured bounds %d and %d), batch %s",
            self._device.get("architecture"),
            self._device.get("firmware"),
            self._device.get("serial"),
            self._hef_arch,
            self._input,
            self._frame_shape,
            self._plan.queue_size,
            self._plan.frames_per_job,
            self._plan.max_jobs,
            options.frames_per_job,
            options.max_jobs,
            self._batch_size or "HailoRT's choice",
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
            status = hailo_status(exc)
            if status == OUT_OF_PHYSICAL_DEVICES and not find_devices():
                # HailoRT says 74 for "no device" too (its device count check): ask the bus
                msg = (
                    f"no Hailo device found ({text}); check `hailortcli scan`, `lspci | grep "
                    "Hailo` and docs/hardware.md"
                )
            elif status == OUT_OF_PHYSICAL_DEVICES:
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
            "serial": str(board.serial_number).strip().strip("\x00").strip() or "n/a",
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

    def _configure(self) -> Any:
        """Configure with the configured device batch, or HailoRT's choice if the device refuses it.

        HailoRT refuses a batch above 63 or above the async queue (which it sizes to at least two
        batches, so the second should not happen); a refused batch falls back to HailoRT's own
        choice, loudly, rather than leaving the node without a model. No probing configure: each
        configure adds a core-op the VDevice keeps until it is released (hailo-notes.md 7)."""
        wanted = self._options.batch_size
        if wanted:
            self._model.set_batch_size(wanted)
            try:
                return self._call(self._model.configure)
            except BackendError as exc:
                logger.warning(
                    "the device refused hailo_batch_size %d (%s); letting HailoRT choose",
                    wanted,
                    exc,
                )
                self._model.set_batch_size(0)
                self._batch_size = 0
        return self._call(self._model.configure)

    def _read_plan(self) -> AsyncPlan:
        queue = int(self._call(self._configured.get_async_queue_size))
        return AsyncPlan.fit(queue, self._options.frames_per_job, self._options.max_jobs)

    @property
    def plan(self) -> AsyncPlan:
        """The async plan in force (asked of the device at the last configure)."""
        return self._plan

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
            self._aborted = False
            try:
                return self._run(windows)
            except BackendError as first:
                if self._aborted:  # the watchdog gave up on this call: no retry behind its back
                    raise
                logger.warning("Hailo batch failed (%s); reconfiguring and retrying once", first)
                self._reconfigure()
                return self._run(windows)

    def _run(self, windows: FloatArray) -> InferenceOutput:
        frames = np.ascontiguousarray(windows.reshape(len(windows), *self._frame_shape))
        outputs = [(self._latent, np.empty((len(windows), *self._latent[1]), np.float32))]
        if self._logits is not None:
            outputs.append((self._logits, np.empty((len(windows), *self._logits[1]), np.float32)))
        timeout = self._options.timeout_ms
        plan = self._plan
        step = plan.frames_per_job
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
                if len(jobs) >= plan.max_jobs:  # frames in flight never exceed the queue
                    self._wait(*jobs.pop(0), timeout)
                self._configured.wait_for_async_ready(
                    timeout_ms=timeout, frames_count=len(bindings)
                )
                state = _Job()
                job = self._configured.run_async(bindings, functools.partial(_completed, state))
                jobs.append((job, state))
            for job, state in jobs:
                self._wait(job, state, timeout)
        except EdgeError:
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
        if self._aborted:
            msg = "the inference call was aborted"
            raise BackendError(msg)
        try:
            self._configured.shutdown()
        except Exception:
            logger.debug("shutdown of a failed pipeline raised", exc_info=True)
        self._configured = self._configure()
        self._plan = self._read_plan()

    def abort(self) -> None:
        """Shut the pipeline down from another thread: a call stuck on the device returns with
        an error (its in-flight jobs are aborted); the next batch reconfigures. Never blocks on
        the inference lock."""
        self._aborted = True
        try:
            self._configured.shutdown()
        except Exception:
            logger.debug("shutdown of a stuck pipeline raised", exc_info=True)

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
                "async_queue_size": self._plan.queue_size,
                "frames_per_job": self._plan.frames_per_job,
                "max_jobs": self._plan.max_jobs,
                "batch_size": self._batch_size,
            },
        )

    def close(self) -> None:
        """Shut the pipeline down and release the device (idempotent). A call stuck on the
        device is aborted first, so closing never waits on it for more than a few seconds."""
        if not self._lock.acquire(timeout=CLOSE_WAIT_S):
            self.abort()  # makes the stuck call return
            if not self._lock.acquire(timeout=CLOSE_WAIT_S):
                logger.error("a Hailo call does not return; releasing the device under it")
                self._closed = True
                self._release_vdevice()
                return
        try:
            if self._closed:
                return
            self._closed = True
            try:
                self._configured.shutdown()
            except Exception:
                logger.warning("Hailo pipeline shutdown failed", exc_info=True)
            self._release_vdevice()
        finally:
            self._lock.release()

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


def hailo_status(exc: BaseException) -> int | None:
    """The HailoRT status code of an exception, Python-level or raw C++, when it carries one.

    Python classes say "libhailort failed with error: N (NAME)"; the raw
    `_pyhailort.HailoRTStatusException` that unwrapped calls leak has just "N" as `args[0]`."""
    if type(exc).__name__ == "HailoRTStatusException" and exc.args:
        text = str(exc.args[0]).strip()
        return int(text) if text.isdigit() else None
    match = _STATUS.search(str(exc))
    return int(match.group(1)) if match else None


def _backend_error(exc: BaseException) -> EdgeError:
    """Map a HailoRT exception (Python or raw C++) to our error with a hint."""
    if isinstance(exc, EdgeError):
        return exc
    name = type(exc).__name__
    status = hailo_status(exc)
    detail = str(exc) if name != "HailoRTStatusException" else f"status {status}"
    if "HEFNotCompatible" in name or "InvalidHEF" in name or status in (26, 93):
        return ModelContractError(f"the HEF does not fit this device: {detail}")
    if name == "HailoRTTimeout" or status == TIMEOUT:
        return BackendError(
            f"Hailo device timed out ({detail}); check `hailortcli fw-control identify`"
        )
    return BackendError(f"HailoRT error {name}: {detail}")


def _probe(bundle: Bundle) -> tuple[bool, str]:
    if bundle.hef is None:
        return False, "the bundle has no HEF"
    try:
        import_hailo()
    except BackendUnavailableError:
        return False, "hailo_platform is not installed"
    devices = find_devices()
    if not devices:
        return False, "no Hailo device found"
    return True, f"Hailo device {devices[0]}"


KIND = BackendKind(
    name="hailo",
    open=HailoBackend,
    probe=_probe,
    shares_session=False,  # HailoRT's InferModel is driven from one thread, with jobs in flight
    options=("timeout_ms", "max_jobs", "frames_per_job", "batch_size"),
)
"""HailoRT's declaration for the registry."""
