"""Compiling bundles for Hailo (fleet.compile) against the `hailo_sdk_client` stand-in.

The real Dataflow Compiler only installs on x86-64 Ubuntu from Hailo's Developer Zone, so these
tests run the orchestration against tests/hailo_standin/hailo_sdk_client, which keeps the DFC's
call shapes (hailo-notes.md section 4), is strict about them (node names, NHWC calibration data,
call order) and emulates with ONNX Runtime plus the same uint8 quantisation the HEF stand-in uses.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.bundle import Bundle, read_bundle
from common.errors import BundleError
from fleet.bundles.calibration import CalibrationSet, simulated_calibration
from fleet.bundles.reference import build_reference_bundle
from fleet.compile import (
    STEPS,
    CompileError,
    CompileReport,
    CompilerUnavailableError,
    CompileValidationError,
    compile_bundle,
)
from fleet.compile.dfc_api import end_node_names, model_script, net_name_for, to_nhwc
from runtime.backend import BackendOptions
from runtime.normalize import Normalizer
from runtime.pipeline import load_model

# The stand-in packages (hailo_sdk_client, hailo_standin) live outside the installed project, so
# their folder goes on sys.path before they are imported. conftest.py does this too, but this
# module should not depend on that.
STANDIN = Path(__file__).resolve().parent / "hailo_standin"
if str(STANDIN) not in sys.path:
    sys.path.insert(0, str(STANDIN))

import hailo_sdk_client  # noqa: E402 (needs the path above)
from hailo_standin.fake_hef import parse_hef  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    """The reference bundle (ONNX only)."""
    path = tmp_path_factory.mktemp("compile") / "tcn-reference-1.0.0.tar"
    return read_bundle(build_reference_bundle(path))


@pytest.fixture(scope="module")
def calibration() -> CalibrationSet:
    """16 simulated windows per activity."""
    return simulated_calibration(16)


@pytest.fixture
def no_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    """No stand-in fault switches from the caller's environment."""
    monkeypatch.delenv(hailo_sdk_client.ENV, raising=False)


@pytest.fixture
def runners(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every ClientRunner the orchestration creates, for looking inside."""
    created: list[Any] = []

    class Recording(hailo_sdk_client.ClientRunner):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            created.append(self)

    monkeypatch.setattr(hailo_sdk_client, "ClientRunner", Recording)
    return created


def nhwc(bundle: Bundle, calibration: CalibrationSet) -> np.ndarray:
    """Normalised calibration windows as the DFC's NHWC input."""
    return to_nhwc(Normalizer(bundle.manifest.normalization).apply(calibration.windows))


def translated(bundle: Bundle, tmp_path: Path) -> hailo_sdk_client.ClientRunner:
    """A stand-in runner holding the translated reference model."""
    assert bundle.onnx is not None
    path = tmp_path / "model.onnx"
    path.write_bytes(bundle.onnx)
    runner = hailo_sdk_client.ClientRunner(hw_arch="hailo8")
    manifest = bundle.manifest
    runner.translate_onnx_model(
        str(path),
        "tcn_reference",
        start_node_names=[manifest.input.name],
        end_node_names=end_node_names(bundle.onnx, [manifest.outputs.latent.name]),
        net_input_shapes={manifest.input.name: [1, 100, 9]},
    )
    return runner


# -- the orchestration ------------------------------------------------------------------------


@pytest.mark.usefixtures("no_faults")
@pytest.mark.parametrize("hw_arch", ["hailo8", "hailo8l"])
def test_compiles_a_bundle_with_its_hef(
    bundle: Bundle, calibration: CalibrationSet, tmp_path: Path, hw_arch: Any
) -> None:
    steps: list[str] = []
    out = tmp_path / f"tcn-reference-{hw_arch}.tar"
    report = compile_bundle(bundle, calibration, hw_arch=hw_arch, out=out, progress=steps.append)

    assert isinstance(report, CompileReport)
    assert steps == list(STEPS)
    assert set(report.durations) == set(STEPS)
    assert report.hw_arch == hw_arch
    assert report.out == out
    assert report.calibration_size == len(calibration.windows)
    assert report.compiler == f"hailo_sdk_client {hailo_sdk_client.__version__}"
    assert report.cosine_mean >= 0.95
    assert report.cosine_min <= report.cosine_mean
    assert report.native_cosine_mean >= 0.9999
    assert report.golden_cosine_min >= bundle.manifest.golden.min_cosine_quantized
    assert 0 < report.max_abs_error < 1

    compiled = read_bundle(out)
    assert {"model.hef", "model.onnx"} <= compiled.files.keys()
    assert compiled.onnx == bundle.onnx
    manifest = compiled.manifest
    assert manifest.hef is not None
    assert manifest.hef.hw_arch == hw_arch
    assert manifest.hef.quantized
    assert manifest.hef.compiler == report.compiler
    assert manifest.hef.cosine_mean == pytest.approx(report.cosine_mean)
    assert manifest.hef.cosine_mean >= 0.95
    assert manifest.hef.max_abs_error == pytest.approx(report.max_abs_error)
    assert (manifest.name, manifest.version) == (bundle.manifest.name, bundle.manifest.version)
    assert manifest.golden == bundle.manifest.golden
    assert manifest.normalization == bundle.manifest.normalization
    for name in (manifest.golden.inputs, manifest.golden.latents):
        assert compiled.files[name] == bundle.files[name]

    assert compiled.hef is not None
    hef = parse_hef(compiled.hef)
    assert hef.hw_arch == hw_arch
    assert hef.network_group == "tcn_reference" == report.net_name
    assert hef.quantized
    assert all(s.name.startswith("tcn_reference/") for s in [*hef.inputs, *hef.outputs])
    assert [s.onnx_name for s in hef.outputs] == [manifest.outputs.latent.name]
    assert hef.outputs[0].shape == [64]
    assert hef.inputs[0].onnx_name == manifest.input.name


@pytest.mark.usefixtures("no_faults")
def test_the_compiled_bundle_passes_the_nodes_golden_check(
    bundle: Bundle, calibration: CalibrationSet, tmp_path: Path
) -> None:
    hailo = pytest.importorskip("hailo_platform", reason="needs the HailoRT stand-in")
    if not hasattr(hailo, "VDevice"):  # a bare namespace package: the stand-in is not there
        pytest.skip("needs the HailoRT stand-in (hailo_platform.VDevice)")
    out = tmp_path / "compiled.tar"
    compile_bundle(bundle, calibration, hw_arch="hailo8l", out=out)
    pipeline = load_model(read_bundle(out), "hailo", BackendOptions())  # runs the golden check
    try:
        assert pipeline.info.quantized
    finally:
        pipeline.close()


@pytest.mark.usefixtures("no_faults")
def test_model_script_has_no_normalization_and_takes_the_optimization_level(
    bundle: Bundle, calibration: CalibrationSet, tmp_path: Path, runners: list[Any]
) -> None:
    report = compile_bundle(
        bundle, calibration, hw_arch="hailo8", out=tmp_path / "b.tar", optimization_level=2
    )
    assert report.optimization_level == 2
    (runner,) = runners
    script = runner.standin_model_script
    assert "normalization" not in script
    assert "model_optimization_flavor(optimization_level=2)" in script
    assert f"calibset_size={len(calibration.windows)}" in script


def test_model_script_without_a_level_leaves_the_dfc_default() -> None:
    script = model_script(96, None)
    assert "model_optimization_flavor" not in script
    assert "normalization" not in script
    assert "calibset_size=96" in script
    assert "batch_size=8" in model_script(96, 0)
    assert "batch_size=3" in model_script(3, 0)


@pytest.mark.usefixtures("no_faults")
def test_saves_the_har_when_asked(
    bundle: Bundle, calibration: CalibrationSet, tmp_path: Path
) -> None:
    har = tmp_path / "tcn.har"
    compile_bundle(bundle, calibration, hw_arch="hailo8", out=tmp_path / "b.tar", har_out=har)
    runner = hailo_sdk_client.ClientRunner(har=str(har))
    data = nhwc(bundle, calibration)[:4]
    with runner.infer_context(hailo_sdk_client.InferenceContext.SDK_QUANTIZED) as ctx:
        assert np.asarray(runner.infer(ctx, data)).reshape(4, -1).shape == (4, 64)


def test_missing_compiler_says_what_to_install(
    bundle: Bundle, calibration: CalibrationSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p).resolve() != STANDIN])
    for name in list(sys.modules):
        if name == "hailo_sdk_client" or name.startswith("hailo_sdk_client."):
            monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "b.tar"
    with pytest.raises(CompilerUnavailableError) as caught:
        compile_bundle(bundle, calibration, hw_arch="hailo8", out=out)
    message = str(caught.value)
    for needed in ("hailo_sdk_client", "Dataflow Compiler", "Developer Zone", "x86-64"):
        assert needed in message
    assert "does not run on the Pi" in message
    assert isinstance(caught.value, BundleError)
    assert not out.exists()


def test_a_package_that_is_not_the_dfc_is_unavailable(
    bundle: Bundle, calibration: CalibrationSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "hailo_sdk_client", types.ModuleType("hailo_sdk_client"))
    with pytest.raises(CompilerUnavailableError, match="no ClientRunner"):
        compile_bundle(bundle, calibration, hw_arch="hailo8", out=tmp_path / "b.tar")


@pytest.mark.parametrize(
    ("fault", "step", "match"),
    [
        ("broken_quantization=1", "check_quantized", "quantization loses too much"),
        ("broken_translation=1", "check_native", "translated model does not match"),
    ],
)
def test_failed_validation_writes_nothing(
    bundle: Bundle,
    calibration: CalibrationSet,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: str,
    step: str,
    match: str,
) -> None:
    monkeypatch.setenv(hailo_sdk_client.ENV, fault)
    steps: list[str] = []
    out = tmp_path / "b.tar"
    with pytest.raises(CompileValidationError, match=match):
        compile_bundle(bundle, calibration, hw_arch="hailo8", out=out, progress=steps.append)
    assert steps == list(STEPS[: STEPS.index(step) + 1])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.usefixtures("no_faults")
def test_a_hef_the_node_would_refuse_is_not_written(
    bundle: Bundle, calibration: CalibrationSet, tmp_path: Path
) -> None:
    # Calibrated on resting windows only, the uint8 ranges clip the golden walk/run latents:
    # fine on its own calibration set, below min_cosine_quantized on the goldens.
    assert calibration.labels is not None
    rest = [i for i, label in enumerate(calibration.labels) if label == "rest"]
    narrow = CalibrationSet(calibration.windows[rest], None, "rest only")
    with pytest.raises(CompileValidationError, match="golden windows"):
        compile_bundle(bundle, narrow, hw_arch="hailo8", out=tmp_path / "b.tar")
    assert list(tmp_path.iterdir()) == []


def test_compiler_failure_is_a_compile_error(
    bundle: Bundle, calibration: CalibrationSet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(hailo_sdk_client.ENV, "compile_error=1")
    with pytest.raises(CompileError, match="BackendAllocatorException") as caught:
        compile_bundle(bundle, calibration, hw_arch="hailo8", out=tmp_path / "b.tar")
    assert not isinstance(caught.value, CompileValidationError)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hw_arch": "hailo10h"}, "hw_arch must be one of"),
        ({"hw_arch": "hailo8", "optimization_level": 5}, "optimization_level must be 0..4"),
    ],
)
def test_refuses_bad_arguments(
    bundle: Bundle, calibration: CalibrationSet, tmp_path: Path, kwargs: Any, match: str
) -> None:
    with pytest.raises(CompileError, match=match):
        compile_bundle(bundle, calibration, out=tmp_path / "b.tar", **kwargs)


def test_refuses_bad_calibration(bundle: Bundle, tmp_path: Path) -> None:
    flat = CalibrationSet(np.zeros((4, 900), np.float32), None, "flat")
    with pytest.raises(CompileError, match=r"expected \(N >= 1, 100, 9\)"):
        compile_bundle(bundle, flat, hw_arch="hailo8", out=tmp_path / "b.tar")


def test_net_name_is_the_sanitised_bundle_name() -> None:
    assert net_name_for("tcn-reference") == "tcn_reference"
    assert net_name_for("har.v2_x") == "har_v2_x"
    assert net_name_for("9axis") == "net_9axis"


# -- the stand-in is as strict as the orchestration needs -------------------------------------


@pytest.mark.usefixtures("no_faults")
def test_standin_optimize_wants_nhwc(
    bundle: Bundle, calibration: CalibrationSet, tmp_path: Path
) -> None:
    runner = translated(bundle, tmp_path)
    data = nhwc(bundle, calibration)
    with pytest.raises(hailo_sdk_client.BadInputsShape, match="NHWC"):
        runner.optimize(data.reshape(len(data), 100, 9))
    with pytest.raises(hailo_sdk_client.BadInputsShape, match="float32"):
        runner.optimize(data.astype(np.float64))
    with pytest.raises(hailo_sdk_client.BadInputsShape):
        runner.optimize(data[:0])
    runner.optimize({"tcn_reference/input_layer1": data})


@pytest.mark.usefixtures("no_faults")
def test_standin_translate_checks_names_and_shapes(bundle: Bundle, tmp_path: Path) -> None:
    assert bundle.onnx is not None
    path = tmp_path / "model.onnx"
    path.write_bytes(bundle.onnx)
    name = bundle.manifest.input.name
    runner = hailo_sdk_client.ClientRunner(hw_arch="hailo8l")
    with pytest.raises(hailo_sdk_client.MisspellNodeError, match="end node"):
        runner.translate_onnx_model(
            str(path), "net", start_node_names=[name], end_node_names=["nope"]
        )
    with pytest.raises(hailo_sdk_client.MisspellNodeError, match="start node"):
        runner.translate_onnx_model(str(path), "net", start_node_names=["nope"])
    with pytest.raises(hailo_sdk_client.UnsupportedShapeError):
        runner.translate_onnx_model(str(path), "net", net_input_shapes={name: [1, 9, 100]})
    with pytest.raises(ValueError, match="net_name"):
        runner.translate_onnx_model(str(path), "tcn-reference")
    # Output tensor names and their producing node names both work (the real rule is unverified).
    for end in (bundle.manifest.outputs.latent.name, "head/Gemm"):
        runner.translate_onnx_model(
            str(path),
            "net",
            start_node_names=[name],
            end_node_names=[end],
            net_input_shapes={name: [1, 100, 9]},
        )


def test_standin_enforces_call_order(bundle: Bundle, tmp_path: Path) -> None:
    runner = hailo_sdk_client.ClientRunner(hw_arch="hailo8")
    with pytest.raises(hailo_sdk_client.InvalidStateError):
        runner.optimize(np.zeros((1, 1, 100, 9), np.float32))
    runner = translated(bundle, tmp_path)
    with pytest.raises(hailo_sdk_client.InvalidStateError):
        runner.compile()
    with pytest.raises(hailo_sdk_client.InvalidStateError):  # noqa: SIM117 (the raise is on enter)
        with runner.infer_context(hailo_sdk_client.InferenceContext.SDK_QUANTIZED):
            pass


@pytest.mark.usefixtures("no_faults")
def test_standin_emulator_quantises_like_the_hef(
    bundle: Bundle, calibration: CalibrationSet, tmp_path: Path
) -> None:
    runner = translated(bundle, tmp_path)
    data = nhwc(bundle, calibration)
    runner.optimize(data)
    context = hailo_sdk_client.InferenceContext
    with runner.infer_context(context.SDK_NATIVE) as ctx:
        native = np.asarray(runner.infer(ctx, data)).reshape(len(data), -1)
    with runner.infer_context(context.SDK_QUANTIZED) as ctx:
        quantized = np.asarray(runner.infer(ctx, data)).reshape(len(data), -1)
    (stream,) = parse_hef(runner.compile()).outputs
    codes = np.clip(np.round(native / stream.qp_scale + stream.qp_zp), 0, 255)
    np.testing.assert_allclose(quantized, (codes - stream.qp_zp) * stream.qp_scale, atol=1e-6)
    assert np.abs(quantized - native).max() <= stream.qp_scale / 2 + 1e-6
