"""The `hailo_platform` stand-in behaves like HailoRT 4.23 on a Hailo-8 (shared/hailo-notes.md)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

# The stand-in packages live in tests/hailo_standin; conftest may not have put it on the path.
STANDIN = Path(__file__).resolve().parent / "hailo_standin"
if str(STANDIN) not in sys.path:
    sys.path.insert(0, str(STANDIN))

import hailo_platform  # noqa: E402 (needs the path above)
from hailo_platform import (  # noqa: E402
    HEF,
    Device,
    FormatType,
    HailoRTException,
    HailoSchedulingAlgorithm,
    VDevice,
)
from hailo_platform.pyhailort.pyhailort import (  # noqa: E402
    DeviceArchitectureTypes,
    HailoRTHEFNotCompatibleWithDevice,
    HailoRTInvalidArgumentException,
    HailoRTInvalidHEFException,
    HailoRTInvalidOperationException,
    HailoRTNetworkGroupNotActivatedException,
    HailoRTNotFoundException,
    HailoRTStreamAborted,
    HailoRTTimeout,
)
from hailo_standin import faults  # noqa: E402
from hailo_standin.fake_hef import make_hef  # noqa: E402
from runtime.reference import build_reference_onnx  # noqa: E402

INPUT, OUTPUT = "tcn/input_layer1", "tcn/fc1"
PYINIT = {
    "VDevice", "HEF", "FormatType", "FormatOrder", "HailoSchedulingAlgorithm", "HailoRTException",
    "HailoStreamInterface", "ConfigureParams", "InputVStreamParams", "OutputVStreamParams",
    "InferVStreams", "Device", "AsyncInferJob", "HailoRTStreamAbortedByUser",
    "HailoCommunicationClosedException",
}  # fmt: skip


@pytest.fixture(autouse=True)
def healthy_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(faults.ENV_VAR, raising=False)
    faults.reset()
    yield
    faults.reset()


@pytest.fixture(scope="module")
def onnx() -> bytes:
    return build_reference_onnx()


@pytest.fixture(scope="module")
def windows() -> np.ndarray:
    return np.random.default_rng(3).standard_normal((8, 1, 100, 9)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(onnx: bytes, windows: np.ndarray) -> np.ndarray:
    """ONNX Runtime's latents for `windows`, frame by frame."""
    session = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"imu_window": w})[0] for w in windows])


def hef_for(onnx: bytes, reference: np.ndarray | None = None, **kw: Any) -> bytes:
    """A stand-in HEF of the reference model; output scale from `reference`'s range if given."""
    ranges = None
    if reference is not None:
        ranges = {"latent": (float(reference.min()), float(reference.max()))}
    return make_hef(
        onnx, onnx_input="imu_window", onnx_outputs={"latent": 64}, output_ranges=ranges, **kw
    )


@pytest.fixture(scope="module")
def hef(onnx: bytes, reference: np.ndarray) -> bytes:
    return hef_for(onnx, reference)


@pytest.fixture
def vdevice() -> Iterator[VDevice]:
    params = VDevice.create_params()
    params.scheduling_algorithm = HailoSchedulingAlgorithm.ROUND_ROBIN
    with VDevice(params) as device:
        yield device


def float_model(vdevice: VDevice, hef: bytes) -> Any:
    model = vdevice.create_infer_model(hef)
    model.input().set_format_type(FormatType.FLOAT32)
    for name in model.output_names:
        model.output(name).set_format_type(FormatType.FLOAT32)
    return model


def bindings_for(configured: Any, windows: np.ndarray, out: np.ndarray) -> list[Any]:
    """One Bindings per frame: window i in, row i of `out` out."""
    return [
        configured.create_bindings(input_buffers={INPUT: w}, output_buffers={OUTPUT: o})
        for w, o in zip(windows, out, strict=True)
    ]


class Completions:
    """A run_async callback that records each completion_info.exception (keyword-only)."""

    def __init__(self) -> None:
        self.errors: list[BaseException | None] = []
        self.done = threading.Event()

    def __call__(self, *, completion_info: Any, tag: str = "") -> None:
        self.errors.append(completion_info.exception)
        self.done.set()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b))


# -- the canonical flow ------------------------------------------------------------------------


def test_canonical_flow_matches_onnx_within_quantisation(
    vdevice: VDevice, hef: bytes, windows: np.ndarray, reference: np.ndarray
) -> None:
    model = float_model(vdevice, hef)
    scale = model.output(OUTPUT).quant_infos[0].qp_scale
    out = np.zeros((8, 64), np.float32)
    with model.configure() as configured:
        bindings = bindings_for(configured, windows, out)
        configured.wait_for_async_ready(timeout_ms=1000, frames_count=len(bindings))
        seen = Completions()
        job = configured.run_async(bindings, functools.partial(seen, tag="batch"))
        job.wait(2000)
    assert seen.errors == [None]  # one callback for the 8 frames of one job
    assert bindings[3].output(OUTPUT).get_buffer() is not None
    assert np.abs(out - reference).max() <= scale
    assert min(cosine(a, b) for a, b in zip(out, reference, strict=True)) > 0.999
    assert not np.array_equal(out, reference)  # the uint8 round trip is visible


def test_unquantised_hef_is_exact(
    vdevice: VDevice, onnx: bytes, windows: np.ndarray, reference: np.ndarray
) -> None:
    model = float_model(vdevice, hef_for(onnx, quantized=False))
    out = np.zeros((8, 64), np.float32)
    with model.configure() as configured:
        configured.run(bindings_for(configured, windows, out), 2000)
    np.testing.assert_array_equal(out, reference)


def test_wait_includes_the_callback(vdevice: VDevice, hef: bytes, windows: np.ndarray) -> None:
    finished = threading.Event()

    def slow(*, completion_info: Any) -> None:
        time.sleep(0.2)
        finished.set()

    with float_model(vdevice, hef).configure() as configured:
        out = np.zeros((1, 64), np.float32)
        configured.run_async(bindings_for(configured, windows[:1], out), slow).wait(1000)
        assert finished.is_set()


def test_names_shapes_and_formats_come_from_the_hef(vdevice: VDevice, hef: bytes) -> None:
    model = vdevice.create_infer_model(hef)
    assert model.input_names == [INPUT]
    assert model.output_names == [OUTPUT]
    assert model.input().shape == [1, 100, 9]
    assert model.output().shape == [64]
    assert model.input().format.type == FormatType.UINT8  # the HEF's, until set_format_type
    assert model.output().format.type == FormatType.UINT8
    assert model.input(INPUT).quant_infos[0].qp_zp == 128.0
    assert model.output().is_nms is False
    with pytest.raises(HailoRTNotFoundException):
        model.input("imu_window")
    infos = model.hef.get_input_vstream_infos()
    assert infos[0].shape == (1, 100, 9)
    assert model.hef.get_output_vstream_infos()[0].shape == (64,)
    assert model.hef.get_sorted_output_names() == [OUTPUT]
    assert model.hef.get_network_group_names() == ["tcn"]


def test_onnx_names_are_refused_by_create_bindings(vdevice: VDevice, hef: bytes) -> None:
    with float_model(vdevice, hef).configure() as configured:
        window = np.zeros((1, 100, 9), np.float32)
        with pytest.raises(HailoRTNotFoundException) as caught:
            configured.create_bindings(input_buffers={"imu_window": window})
        assert isinstance(caught.value, HailoRTInvalidArgumentException)
        with pytest.raises(HailoRTException):
            configured.create_bindings(output_buffers={"latent": np.zeros(64, np.float32)})


# -- buffers, formats and the error-shuts-the-pipeline rule ------------------------------------


def test_uint8_default_refuses_float_buffers_and_shuts_down(
    vdevice: VDevice, hef: bytes, windows: np.ndarray
) -> None:
    model = vdevice.create_infer_model(hef)  # no set_format_type: uint8 in and out
    configured = model.configure()
    out = np.zeros((1, 64), np.float32)
    with pytest.raises(HailoRTInvalidOperationException):
        configured.run_async(bindings_for(configured, windows[:1], out))
    right = configured.create_bindings(
        input_buffers={INPUT: np.zeros((1, 100, 9), np.uint8)},
        output_buffers={OUTPUT: np.zeros(64, np.uint8)},
    )
    with pytest.raises(HailoRTStreamAborted):  # the pipeline is down until reconfigured
        configured.run_async([right])
    with pytest.raises(HailoRTException):
        configured.wait_for_async_ready(100)
    again = model.configure()
    again.run([right], 1000)
    assert right.output().get_buffer().any()
    again.shutdown()


def test_uint8_io_is_quantised_with_the_stream_quant_infos(
    vdevice: VDevice, hef: bytes, windows: np.ndarray, reference: np.ndarray
) -> None:
    model = vdevice.create_infer_model(hef)
    qin, qout = model.input().quant_infos[0], model.output().quant_infos[0]
    raw = np.clip(np.rint(windows[0] / qin.qp_scale + qin.qp_zp), 0, 255).astype(np.uint8)
    with model.configure() as configured:
        bindings = configured.create_bindings(
            input_buffers={INPUT: raw}, output_buffers={OUTPUT: np.zeros(64, np.uint8)}
        )
        configured.run([bindings], 1000)
    latent = (bindings.output().get_buffer().astype(np.float32) - qout.qp_zp) * qout.qp_scale
    assert cosine(latent, reference[0]) > 0.99


def test_set_buffer_needs_c_contiguous(vdevice: VDevice, hef: bytes) -> None:
    with float_model(vdevice, hef).configure() as configured:
        bindings = configured.create_bindings()
        strided = np.zeros((1, 100, 18), np.float32)[:, :, ::2]
        with pytest.raises(HailoRTException, match="C_CONTIGUOUS"):
            bindings.input().set_buffer(strided)


def test_missing_output_buffer_fails_the_submit(vdevice: VDevice, hef: bytes) -> None:
    with float_model(vdevice, hef).configure() as configured:
        bindings = configured.create_bindings({INPUT: np.zeros((1, 100, 9), np.float32)})
        with pytest.raises(HailoRTNotFoundException):
            configured.run_async([bindings])


# -- async queue -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4, 8, 16])
def test_queue_size_ready_and_queue_full(
    vdevice: VDevice, hef: bytes, windows: np.ndarray, size: int
) -> None:
    faults.set_faults(latency_ms=300, async_queue_size=size)  # keep the first job on the device
    with float_model(vdevice, hef).configure() as configured:
        assert configured.get_async_queue_size() == size
        with pytest.raises(HailoRTTimeout):
            configured.wait_for_async_ready(timeout_ms=50, frames_count=size + 1)
        out = np.zeros((size, 64), np.float32)
        configured.wait_for_async_ready(frames_count=size)
        first = Completions()
        frames = np.resize(windows, (size, *windows.shape[1:]))
        configured.run_async(bindings_for(configured, frames, out), first)
        with pytest.raises(HailoRTTimeout):
            configured.wait_for_async_ready(timeout_ms=50)
        more = bindings_for(configured, windows[:1], np.zeros((1, 64), np.float32))
        with pytest.raises(HailoRTException, match=r"82 \(HAILO_QUEUE_IS_FULL\)"):
            configured.run_async(more)  # submitted without waiting: error and shutdown
        assert first.done.wait(2)
        assert isinstance(first.errors[0], HailoRTStreamAborted)
        with pytest.raises(HailoRTStreamAborted):
            configured.run_async(more)


def test_queue_size_is_derived_from_the_hef_as_hailort_does(vdevice: VDevice, hef: bytes) -> None:
    """clamp(32 MiB / frame bytes, 2 * batch, max(2 * batch, 32)): a tiny model gets 32."""
    model = float_model(vdevice, hef)
    with model.configure() as configured:
        assert configured.get_async_queue_size() == 32
    model.set_batch_size(20)
    with model.configure() as configured:
        assert configured.get_async_queue_size() == 40


def test_batch_size_must_fit_the_queue(vdevice: VDevice, hef: bytes) -> None:
    faults.set_faults(async_queue_size=8)
    model = float_model(vdevice, hef)
    model.set_batch_size(16)
    with pytest.raises(HailoRTInvalidOperationException):
        model.configure()
    model.set_batch_size(8)
    model.configure().shutdown()
    model.set_batch_size(64)
    with pytest.raises(HailoRTInvalidArgumentException):
        model.configure()


# -- faults --------------------------------------------------------------------------------------


def test_timeout_fault_surfaces_as_hailort_timeout(
    vdevice: VDevice, hef: bytes, windows: np.ndarray, reference: np.ndarray
) -> None:
    faults.set_faults(timeouts=1)
    model = float_model(vdevice, hef)
    configured = model.configure()
    out = np.zeros((1, 64), np.float32)
    seen = Completions()
    job = configured.run_async(bindings_for(configured, windows[:1], out), seen)
    with pytest.raises(HailoRTTimeout):
        job.wait(100)
    configured.shutdown()  # aborts the hung frame
    assert seen.done.wait(2)
    assert isinstance(seen.errors[0], HailoRTStreamAborted)
    assert faults.current().timeouts == 0
    with model.configure() as fresh:  # the next job is served
        fresh.run(bindings_for(fresh, windows[:1], out), 1000)
    assert np.abs(out[0] - reference[0]).max() <= model.output().quant_infos[0].qp_scale


def test_sync_run_times_out_too(vdevice: VDevice, hef: bytes, windows: np.ndarray) -> None:
    out = np.zeros((1, 64), np.float32)
    with faults.injected(timeouts=1), float_model(vdevice, hef).configure() as configured:
        bindings = bindings_for(configured, windows[:1], out)
        with pytest.raises(HailoRTTimeout):
            configured.run(bindings, 50)
    assert faults.current().timeouts == 0


def test_second_vdevice_is_busy_unless_the_group_is_shared(vdevice: VDevice) -> None:
    with pytest.raises(HailoRTException, match=r"74 \(HAILO_OUT_OF_PHYSICAL_DEVICES\)"):
        VDevice()
    with Device() as device:  # control only: does not count as a user of the chip
        assert device.control.identify().device_architecture == DeviceArchitectureTypes.HAILO8
    vdevice.release()
    shared = VDevice.create_params()
    shared.group_id = "SHARED"
    with VDevice(shared), VDevice(shared) as second:
        assert second.get_physical_devices_ids() == ["0000:01:00.0"]


def test_busy_fault_refuses_vdevices() -> None:
    faults.set_faults(busy=True)
    with pytest.raises(HailoRTException, match=r"74 \(HAILO_OUT_OF_PHYSICAL_DEVICES\)"):
        VDevice()
    assert Device().control.get_chip_temperature().ts0_temperature == 45.0


def test_no_device() -> None:
    faults.set_faults(no_device=True)
    assert Device.scan() == []
    with pytest.raises(HailoRTException, match="HailoRT device not found in the system"):
        Device()
    with pytest.raises(HailoRTException, match=r"74 \(HAILO_OUT_OF_PHYSICAL_DEVICES\)"):
        VDevice()  # real 4.23 fails its device count check, exactly as for a busy chip


def test_unwrapped_calls_leak_the_raw_cpp_exception() -> None:
    from hailo_platform.pyhailort import _pyhailort

    with pytest.raises(_pyhailort.HailoRTStatusException) as raised:
        Device("0000:09:00.0")
    assert raised.value.args[0] == "61"
    assert not isinstance(raised.value, HailoRTException)  # 4.x: unrelated to the Python class


def test_a_mismatched_compiled_half_fails_the_import() -> None:
    env = {**os.environ, "PYTHONPATH": str(STANDIN), faults.ENV_VAR: "pyhailort_version=4.20.0"}
    completed = subprocess.run(
        [sys.executable, "-c", "import hailo_platform"],
        capture_output=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert completed.returncode == 1
    assert b"ImportError: _pyhailort version (4.20.0) does not match" in completed.stderr


def test_arch_is_checked_at_configure(onnx: bytes) -> None:
    faults.set_faults(arch="hailo8l")
    with VDevice() as vdevice:
        board = vdevice.get_physical_devices()[0].control.identify()
        assert board.device_architecture == DeviceArchitectureTypes.HAILO8L
        eight_only = vdevice.create_infer_model(hef_for(onnx, hw_arch="hailo8"))  # parses fine
        with pytest.raises(HailoRTHEFNotCompatibleWithDevice):
            eight_only.configure()
        eight_l = vdevice.create_infer_model(hef_for(onnx, hw_arch="hailo8l"))
        eight_l.configure().shutdown()
    faults.set_faults(arch="hailo8")  # a Hailo-8 runs 8L HEFs too
    with VDevice() as vdevice:
        vdevice.create_infer_model(hef_for(onnx, hw_arch="hailo8l")).configure().shutdown()


def test_fail_configure_fault(vdevice: VDevice, hef: bytes) -> None:
    faults.set_faults(fail_configure=1)
    model = float_model(vdevice, hef)
    with pytest.raises(HailoRTException, match="driver"):
        model.configure()
    model.configure().shutdown()


def test_identify_and_temperature() -> None:
    faults.set_faults(temperature_c=61.5)
    assert Device.scan() == ["0000:01:00.0"]
    with Device() as device:
        board = device.control.identify()
        temperature = device.control.get_chip_temperature()
    assert board.firmware_version == "4.23.0"
    assert board.device_architecture.name == "HAILO8"
    assert "Device Architecture: HAILO8" in str(board)
    for field in ("protocol_version", "logger_version", "board_name", "serial_number",
                  "part_number", "product_name"):  # fmt: skip
        assert hasattr(board, field)
    assert (temperature.ts0_temperature, temperature.ts1_temperature) == (61.5, 61.5)
    assert temperature.sample_count >= 1


def test_env_var_faults_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    env = "timeouts=2,busy=1,arch=hailo8l,temperature_c=61.5,latency_ms=0.5"
    monkeypatch.setenv(faults.ENV_VAR, env)
    state = faults.current()
    assert (state.timeouts, state.busy, state.arch) == (2, True, "hailo8l")
    assert (state.temperature_c, state.latency_ms, state.no_device) == (61.5, 0.5, False)
    assert faults.consume("timeouts")
    assert faults.current().timeouts == 1
    faults.set_faults(busy=False)  # Python overrides win
    assert faults.current().busy is False
    with faults.injected(arch="hailo8"):
        assert faults.current().arch == "hailo8"
    assert faults.current().arch == "hailo8l"
    monkeypatch.setenv(faults.ENV_VAR, "nonsense=1")
    with pytest.raises(ValueError, match="unknown fault"):
        faults.current()


def test_env_var_faults_reach_a_subprocess() -> None:
    code = (
        "import hailo_platform as h\n"
        "d = h.Device()\n"
        "print(d.control.identify().device_architecture.name,"
        " d.control.get_chip_temperature().ts0_temperature)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(STANDIN)}
    env[faults.ENV_VAR] = "arch=hailo8l,temperature_c=70"
    command = [sys.executable, "-c", code]
    done = subprocess.run(command, capture_output=True, env=env, timeout=60, check=True)
    assert done.stdout.split() == [b"HAILO8L", b"70.0"]


# -- API surface ---------------------------------------------------------------------------------


def test_exports_version_and_old_api() -> None:
    assert hailo_platform.__version__ == "4.23.0"
    assert set(hailo_platform.__all__) == PYINIT
    assert all(hasattr(hailo_platform, name) for name in PYINIT)
    with pytest.raises(NotImplementedError, match="old vstream API"):
        hailo_platform.InferVStreams(None, None, None)
    with pytest.raises(NotImplementedError):
        hailo_platform.ConfigureParams.create_from_hef(None, interface=None)
    with pytest.raises(NotImplementedError):
        hailo_platform.InputVStreamParams.make(None)
    with pytest.raises(NotImplementedError):
        hailo_platform.OutputVStreamParams.make(None)


def test_create_params_defaults_to_no_scheduler() -> None:
    params = VDevice.create_params()
    assert params.scheduling_algorithm == HailoSchedulingAlgorithm.NONE
    assert params.device_count == 1
    assert params.group_id == "UNIQUE"
    assert params.multi_process_service is False


def test_without_scheduler_activate_yourself(hef: bytes, windows: np.ndarray) -> None:
    with VDevice() as vdevice, float_model(vdevice, hef).configure() as configured:
        with pytest.raises(HailoRTInvalidOperationException):
            configured.set_scheduler_priority(20)
        out = np.zeros((1, 64), np.float32)
        with pytest.raises(HailoRTNetworkGroupNotActivatedException):
            configured.run_async(bindings_for(configured, windows[:1], out))
    with VDevice() as vdevice, float_model(vdevice, hef).configure() as configured:
        configured.activate()
        configured.run(bindings_for(configured, windows[:1], out), 1000)
        assert out.any()


def test_scheduler_calls_under_round_robin(vdevice: VDevice, hef: bytes) -> None:
    with float_model(vdevice, hef).configure() as configured:
        configured.set_scheduler_priority(20)
        configured.set_scheduler_timeout(10)
        configured.set_scheduler_threshold(2)
        with pytest.raises(HailoRTInvalidArgumentException):
            configured.set_scheduler_priority(32)
        with pytest.raises(HailoRTInvalidOperationException):
            configured.activate()


def test_hef_sources(vdevice: VDevice, hef: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.hef"
    path.write_bytes(hef)
    with pytest.raises(ValueError, match="str"):
        vdevice.create_infer_model(path)
    with pytest.raises(ValueError, match="str"):
        HEF(path)  # type: ignore[arg-type]
    assert HEF(str(path)).path == str(path)
    assert vdevice.create_infer_model(str(path)).input_names == [INPUT]
    assert vdevice.create_infer_model(os.fspath(path)).hef.path == str(path)
    with pytest.raises(HailoRTInvalidHEFException):
        HEF(b"not a hef at all")
    with pytest.raises(HailoRTInvalidHEFException):
        vdevice.create_infer_model(b"garbage")


def test_released_objects_raise(hef: bytes, windows: np.ndarray) -> None:
    vdevice = VDevice()
    model = float_model(vdevice, hef)
    with model.configure() as configured:
        pass
    with pytest.raises(AttributeError):  # what the real one raises after __exit__
        configured.run_async([])
    vdevice.release()
    with pytest.raises(HailoRTException):
        vdevice.create_infer_model(hef)
    with pytest.raises(HailoRTException):
        model.configure()
    VDevice().release()  # the chip is free again


def test_more_chips_let_more_vdevices_open(vdevice: VDevice) -> None:
    faults.set_faults(devices=2)
    assert Device.scan() == ["0000:01:00.0", "0000:02:00.0"]
    with VDevice() as second:
        assert second.get_physical_devices_ids() == ["0000:02:00.0"]
        with pytest.raises(HailoRTException, match=r"74 \(HAILO_OUT_OF_PHYSICAL_DEVICES\)"):
            VDevice()


def test_a_raising_callback_is_reported_and_the_pipeline_goes_on(
    vdevice: VDevice, hef: bytes, windows: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    reported: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", reported.append)

    def broken(*, completion_info: Any) -> None:
        raise RuntimeError("bug in the callback")  # real HailoRT would very likely abort here

    out = np.zeros((1, 64), np.float32)
    with float_model(vdevice, hef).configure() as configured:
        configured.run_async(bindings_for(configured, windows[:1], out), broken).wait(1000)
        assert isinstance(reported[0].exc_value, RuntimeError)
        configured.run(bindings_for(configured, windows[:1], out), 1000)
