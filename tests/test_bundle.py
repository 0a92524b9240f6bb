"""Model bundles: round trip, reproducibility, tamper refusal, building, normalisation,
calibration, golden check and k-means."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from onnx import TensorProto, helper

from common.bundle import (
    MANIFEST_NAME,
    Bundle,
    file_entries,
    npy_bytes,
    parse_bundle,
    read_bundle,
    write_bundle,
)
from common.errors import BundleError, ModelContractError
from fleet.bundles.builder import build_bundle, load_normalization
from fleet.bundles.calibration import load_calibration
from fleet.bundles.inspect import describe_bundle
from fleet.bundles.kmeans import kmeans
from fleet.bundles.reference import build_reference_bundle
from fleet.simulate.imu_signals import calibration_set
from runtime import pipeline as pipeline_module
from runtime.backend import BackendOptions, InferenceBackend
from runtime.errors import BackendError, GoldenCheckError
from runtime.normalize import Normalizer
from runtime.onnx_backend import OnnxBackend
from runtime.pipeline import load_model
from runtime.reference import build_reference_onnx, make_reference_weights, reference_forward
from schemas.limits import CHANNEL_ORDER, CHANNELS, LATENT_DIM, WINDOW_LENGTH
from schemas.manifest import Normalization

FloatArray = NDArray[np.float32]
Member = tuple[str, bytes]


# --- helpers --------------------------------------------------------------------------------------


def members_of(data: bytes) -> list[Member]:
    """(name, content) of every member of a tar, in order."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        out = []
        for info in tar:
            extracted = tar.extractfile(info)
            out.append((info.name, extracted.read() if extracted else b""))
        return out


def make_tar(members: list[Member], extra: Sequence[tarfile.TarInfo] = ()) -> bytes:
    """A tar of regular files plus any extra (non-file) headers."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, content in members:
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for info in extra:
            tar.addfile(info)
    return buffer.getvalue()


def data_span(data: bytes, name: str) -> tuple[int, int]:
    """Byte range of a member's content inside the tar."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        info = tar.getmember(name)
        return info.offset_data, info.offset_data + info.size


def with_manifest(members: list[Member], manifest: bytes) -> list[Member]:
    return [(n, manifest if n == MANIFEST_NAME else c) for n, c in members]


def refused(data: bytes) -> str:
    """Parse a bundle that must be refused; returns the message."""
    with pytest.raises(BundleError) as info:
        parse_bundle(data)
    return str(info.value)


def same_bundle(a: Bundle, b: Bundle) -> bool:
    return a.manifest == b.manifest and a.files == b.files


def write_onnx(directory: Path, name: str, model: bytes | onnx.ModelProto) -> Path:
    path = directory / name
    path.write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    return path


def tiny_model(inputs: list[tuple[str, list[int]]], output_shape: list[int]) -> onnx.ModelProto:
    """A one-node graph: Identity of the first input (Sum of all when there are several)."""
    op = "Identity" if len(inputs) == 1 else "Sum"
    graph = helper.make_graph(
        [helper.make_node(op, [n for n, _ in inputs], ["out"])],
        "tiny",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, output_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    model.ir_version = 7
    return model


def raw_windows(n: int, seed: int = 0) -> FloatArray:
    rng = np.random.default_rng(seed)
    scale = np.array([2, 2, 2, 50, 50, 50, 40, 40, 40], dtype=np.float32)
    return (rng.standard_normal((n, WINDOW_LENGTH, CHANNELS)) * scale).astype(np.float32)


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tar_bytes(reference_bundle_path: Path) -> bytes:
    return reference_bundle_path.read_bytes()


@pytest.fixture(scope="module")
def reference_members(tar_bytes: bytes) -> list[Member]:
    return members_of(tar_bytes)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundle-tests")


@pytest.fixture(scope="module")
def calibration_npz(work_dir: Path) -> Path:
    """A small labelled calibration set (6 activities x 6 windows) for quick builds."""
    windows, labels = calibration_set(6, seed=3)
    path = work_dir / "calibration.npz"
    np.savez(path, windows=windows, labels=np.array([str(a) for a in labels]))
    return path


@pytest.fixture(scope="module")
def custom_names_bundle(work_dir: Path, calibration_npz: Path) -> Bundle:
    onnx_path = write_onnx(
        work_dir, "custom.onnx", build_reference_onnx(input_name="foo", output_name="bar")
    )
    build_bundle(
        onnx_path=onnx_path,
        name="custom-names",
        version="0.3.1",
        out=work_dir / "custom.tar",
        calibration=calibration_npz,
    )
    return read_bundle(work_dir / "custom.tar")


@pytest.fixture(scope="module")
def dynamic_bundle(work_dir: Path) -> Bundle:
    return read_bundle(build_reference_bundle(work_dir / "dynamic.tar", batch=None))


# --- round trip, inspect, reproducibility ---------------------------------------------------------


def test_reference_bundle_round_trips(reference_bundle_path: Path) -> None:
    bundle = read_bundle(reference_bundle_path)
    manifest = bundle.manifest
    assert (manifest.name, manifest.version) == ("tcn-reference", "1.0.0")
    assert bundle.path == reference_bundle_path
    assert (
        set(bundle.files)
        == set(manifest.files)
        == {
            "model.onnx",
            "golden_inputs.npy",
            "golden_latents.npy",
        }
    )
    assert bundle.onnx is not None
    assert bundle.hef is None
    assert manifest.input.name == "imu_window"
    assert manifest.input.shape == [1, WINDOW_LENGTH, CHANNELS]
    assert manifest.outputs.latent.name == "latent"
    assert manifest.motif_head is not None
    inputs, latents = bundle.golden()
    assert inputs.shape == (manifest.golden.count, WINDOW_LENGTH, CHANNELS)
    assert latents.shape == (manifest.golden.count, LATENT_DIM)
    normalised = Normalizer(manifest.normalization).apply(inputs)
    np.testing.assert_allclose(
        latents, reference_forward(make_reference_weights(), normalised), atol=1e-4
    )


def test_describe_bundle_names_the_model_and_its_files(reference_bundle: Bundle) -> None:
    text = describe_bundle(reference_bundle)
    assert "tcn-reference" in text
    assert "1.0.0" in text
    assert "'imu_window'" in text
    for name, entry in reference_bundle.manifest.files.items():
        assert name in text
        assert entry.sha256[:16] in text
    assert "12 prototypes" in text


def test_write_bundle_is_byte_reproducible(
    reference_bundle: Bundle, tar_bytes: bytes, tmp_path: Path
) -> None:
    first, second = tmp_path / "a" / "one.tar", tmp_path / "two.tar"
    write_bundle(first, reference_bundle.manifest, dict(reference_bundle.files))
    files_reordered = dict(reversed(list(reference_bundle.files.items())))
    write_bundle(second, reference_bundle.manifest, files_reordered)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() == tar_bytes  # read + write reproduces the built file exactly
    assert not list(tmp_path.rglob("*.partial"))


def test_write_bundle_refuses_a_manifest_that_does_not_describe_the_files(
    reference_bundle: Bundle, tmp_path: Path
) -> None:
    files = dict(reference_bundle.files)
    files["model.onnx"] += b"\x00"
    with pytest.raises(BundleError, match=r"manifest\.files does not match"):
        write_bundle(tmp_path / "x.tar", reference_bundle.manifest, files)
    assert not (tmp_path / "x.tar").exists()


# --- tampering ------------------------------------------------------------------------------------


def test_flipped_byte_in_the_model_is_refused(tar_bytes: bytes) -> None:
    start, end = data_span(tar_bytes, "model.onnx")
    corrupt = bytearray(tar_bytes)
    corrupt[(start + end) // 2] ^= 0x01
    message = refused(bytes(corrupt))
    assert "model.onnx" in message
    assert "does not match" in message


@settings(
    deadline=None, max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.floats(0, 1, exclude_max=True), flip=st.integers(1, 255))
def test_any_single_byte_corruption_is_caught_or_harmless(
    tar_bytes: bytes, reference_bundle: Bundle, position: float, flip: int
) -> None:
    """Outside the (unsigned) manifest's text, a flipped byte is refused or changes nothing."""
    start, end = data_span(tar_bytes, MANIFEST_NAME)
    outside = len(tar_bytes) - (end - start)
    index = int(position * outside)
    index = index if index < start else index + (end - start)
    corrupt = bytearray(tar_bytes)
    corrupt[index] ^= flip
    try:
        bundle = parse_bundle(bytes(corrupt))
    except BundleError:
        return
    assert same_bundle(bundle, reference_bundle)


def test_unlisted_member_is_refused(reference_members: list[Member]) -> None:
    message = refused(make_tar([*reference_members, ("notes.txt", b"hello")]))
    assert "does not list" in message
    assert "notes.txt" in message


def test_missing_listed_file_is_refused(reference_members: list[Member]) -> None:
    kept = [m for m in reference_members if m[0] != "golden_latents.npy"]
    message = refused(make_tar(kept))
    assert "missing golden_latents.npy" in message


def test_missing_manifest_is_refused(reference_members: list[Member]) -> None:
    kept = [m for m in reference_members if m[0] != MANIFEST_NAME]
    assert "no manifest.json" in refused(make_tar(kept))


def test_duplicate_member_is_refused(reference_members: list[Member]) -> None:
    assert "appears twice" in refused(make_tar([*reference_members, reference_members[1]]))


@pytest.mark.parametrize(
    "kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.FIFOTYPE]
)
def test_links_and_special_members_are_refused(
    reference_members: list[Member], kind: bytes
) -> None:
    info = tarfile.TarInfo("golden_extra")
    info.type = kind
    info.linkname = "model.onnx" if kind in {tarfile.SYMTYPE, tarfile.LNKTYPE} else ""
    message = refused(make_tar(reference_members, [info]))
    assert "unexpected member 'golden_extra'" in message
    assert "flat regular files" in message


@pytest.mark.parametrize("name", ["sub/model.onnx", "../model.onnx", "/etc/passwd", ".hidden"])
def test_nested_or_hidden_member_names_are_refused(
    reference_members: list[Member], name: str
) -> None:
    assert "unexpected member" in refused(make_tar([*reference_members, (name, b"x")]))


@pytest.mark.parametrize(
    "data",
    [b"", b"not a tar at all", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20, bytes(4096)],
    ids=["empty", "text", "binary", "zeros"],
)
def test_not_a_tar_is_refused(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "bundle.tar"
    path.write_bytes(data)
    with pytest.raises(
        BundleError,
        match=r"bundle\.tar (is not a readable bundle archive|has no manifest\.json)",
    ):
        read_bundle(path)


def test_missing_bundle_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="cannot read bundle"):
        read_bundle(tmp_path / "absent.tar")


def test_manifest_that_is_not_json_is_refused(reference_members: list[Member]) -> None:
    message = refused(make_tar(with_manifest(reference_members, b'{"name": "tcn-reference",')))
    assert "invalid manifest" in message
    assert "JSON" in message


def _manifest_json(members: list[Member]) -> dict[str, Any]:
    manifest: dict[str, Any] = orjson.loads(dict(members)[MANIFEST_NAME])
    return manifest


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"version": "1.0"}, "not semantic"),
        ({"name": "Has Spaces"}, "model name"),
        ({"manifest_version": 2}, "1"),
    ],
)
def test_manifest_failing_validation_is_refused(
    reference_members: list[Member], change: dict[str, Any], expected: str
) -> None:
    manifest = _manifest_json(reference_members) | change
    message = refused(make_tar(with_manifest(reference_members, orjson.dumps(manifest))))
    assert "invalid manifest" in message
    assert expected in message


def test_manifest_validation_message_names_the_missing_field(
    reference_members: list[Member],
) -> None:
    """`invalid manifest: Field required` alone does not say which field is missing."""
    manifest = _manifest_json(reference_members)
    del manifest["golden"]
    message = refused(make_tar(with_manifest(reference_members, orjson.dumps(manifest))))
    assert "invalid manifest" in message
    assert "golden" in message


def test_bundle_over_max_bytes_is_refused(reference_bundle_path: Path) -> None:
    size = reference_bundle_path.stat().st_size
    with pytest.raises(BundleError, match=f"over the {size - 1}-byte limit"):
        read_bundle(reference_bundle_path, max_bytes=size - 1)
    assert read_bundle(reference_bundle_path, max_bytes=size).manifest.name == "tcn-reference"


# --- building: the model contract -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (tiny_model([("x", [1, 100, 8])], [1, 100, 8]), r"\[1, 100, 9\]"),
        (tiny_model([("x", [1, 9, 100])], [1, 9, 100]), r"\[1, 100, 9\]"),
        (tiny_model([("a", [1, 100, 9]), ("b", [1, 100, 9])], [1, 100, 9]), "2 inputs"),
        (tiny_model([("x", [1, 100, 9])], [1, 100, 9]), "no \\[batch, 64\\] latent"),
    ],
    ids=["100x8", "channels-first", "two-inputs", "no-latent"],
)
def test_build_refuses_models_that_break_the_contract(
    tmp_path: Path, model: onnx.ModelProto, expected: str
) -> None:
    onnx_path = write_onnx(tmp_path, "bad.onnx", model)
    with pytest.raises(ModelContractError, match=expected):
        build_bundle(onnx_path=onnx_path, name="bad", version="1.0.0", out=tmp_path / "b.tar")
    assert not (tmp_path / "b.tar").exists()


def test_build_refuses_a_file_that_is_not_onnx(tmp_path: Path) -> None:
    onnx_path = write_onnx(tmp_path, "junk.onnx", b"definitely not protobuf")
    with pytest.raises(ModelContractError, match="cannot load"):
        build_bundle(onnx_path=onnx_path, name="bad", version="1.0.0", out=tmp_path / "b.tar")


@pytest.mark.parametrize(
    ("name", "version", "expected"),
    [("Bad Name", "1.0.0", "model name"), ("ok", "1.0", "not semantic")],
)
def test_build_refuses_bad_names_and_versions(
    tmp_path: Path, name: str, version: str, expected: str
) -> None:
    with pytest.raises(BundleError, match=expected):
        build_bundle(onnx_path=tmp_path / "x.onnx", name=name, version=version, out=tmp_path / "o")


def test_custom_tensor_names_are_recorded_and_served(custom_names_bundle: Bundle) -> None:
    manifest = custom_names_bundle.manifest
    assert manifest.input.name == "foo"
    assert manifest.outputs.latent.name == "bar"
    assert manifest.outputs.motif_logits is None
    assert manifest.motif_head is not None
    assert manifest.motif_head.labels is not None
    assert set(manifest.motif_head.labels) <= {
        "rest",
        "walk",
        "run",
        "turn",
        "stairs",
        "shake",
        "",
    }
    pipeline = load_model(custom_names_bundle, "onnx", BackendOptions())
    try:
        raw = raw_windows(3)
        result = pipeline.run(raw)
        want = reference_forward(
            make_reference_weights(), Normalizer(manifest.normalization).apply(raw)
        )
        np.testing.assert_allclose(result.latent, want, atol=1e-4)
        assert result.scores.shape == (3, 12)
        np.testing.assert_allclose(result.scores.sum(axis=1), 1.0, atol=1e-5)
    finally:
        pipeline.close()


def test_dynamic_batch_model(dynamic_bundle: Bundle) -> None:
    assert dynamic_bundle.manifest.input.shape == [None, WINDOW_LENGTH, CHANNELS]
    backend = OnnxBackend.from_bundle(dynamic_bundle, BackendOptions())
    try:
        assert backend.describe().max_batch is None
        assert backend.describe().detail["batch"] == "dynamic"
        windows = Normalizer(dynamic_bundle.manifest.normalization).apply(raw_windows(5, seed=9))
        batched = backend.infer(windows).latent
        singles = np.concatenate([backend.infer(windows[i : i + 1]).latent for i in range(5)])
        assert batched.shape == (5, LATENT_DIM)
        np.testing.assert_allclose(batched, singles, atol=1e-5, rtol=0)
    finally:
        backend.close()


def test_fixed_batch_model_reports_batch_one(reference_bundle: Bundle) -> None:
    backend = OnnxBackend.from_bundle(reference_bundle, BackendOptions())
    try:
        assert backend.describe().max_batch == 1
        windows = Normalizer(reference_bundle.manifest.normalization).apply(raw_windows(3))
        np.testing.assert_allclose(
            backend.infer(windows).latent,
            reference_forward(make_reference_weights(), windows),
            atol=1e-4,
        )
    finally:
        backend.close()


# --- normalisation --------------------------------------------------------------------------------

MEAN = [0.1, -0.2, 9.8, 0.0, 1.5, -3.0, 20.0, -5.0, 40.0]
STD = [1.0, 1.1, 0.9, 30.0, 31.0, 32.0, 12.0, 13.0, 14.0]


def write_json(path: Path, body: object) -> Path:
    path.write_bytes(orjson.dumps(body))
    return path


def test_plain_normalisation_file(tmp_path: Path) -> None:
    norm = load_normalization(write_json(tmp_path / "norm.json", {"mean": MEAN, "std": STD}))
    assert norm == Normalization(mean=MEAN, std=STD, source="norm.json")


def test_exporter_model_config_is_accepted(tmp_path: Path) -> None:
    body = {
        "normalization": {
            "method": "z_score_per_channel",
            "mean": MEAN,
            "std": STD,
            "channel_order": list(CHANNEL_ORDER),
        },
        "other": 1,
    }
    norm = load_normalization(write_json(tmp_path / "model_config.json", body))
    assert norm.mean == MEAN
    assert norm.std == STD
    assert norm.method == "z_score_per_channel"
    assert norm.source == "model_config.json"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"mean": MEAN[:8], "std": STD}, "mean"),
        ({"mean": MEAN, "std": [*STD, 1.0]}, "std"),
        ({"mean": MEAN, "std": [0.0, *STD[1:]]}, "std must be > 0"),
        ({"mean": MEAN, "std": [-1.0, *STD[1:]]}, "std must be > 0"),
        ({"mean": MEAN}, "needs 'mean' and 'std'"),
        ({"normalization": {"std": STD}}, "needs 'mean' and 'std'"),
        ([MEAN, STD], "needs 'mean' and 'std'"),
        (
            {"mean": MEAN, "std": STD, "channel_order": list(reversed(CHANNEL_ORDER))},
            "channel_order",
        ),
        (
            {"normalization": {"mean": MEAN, "std": STD, "channel_order": ["ax", "ay", "az"]}},
            "channel_order",
        ),
        ({"mean": ["a"] * 9, "std": STD}, "mean"),
    ],
    ids=[
        "short-mean",
        "long-std",
        "zero-std",
        "negative-std",
        "no-std",
        "nested-no-mean",
        "not-an-object",
        "reversed-order",
        "short-order",
        "non-numeric",
    ],
)
def test_bad_normalisation_is_refused(tmp_path: Path, body: object, expected: str) -> None:
    path = write_json(tmp_path / "norm.json", body)
    with pytest.raises(BundleError, match=expected) as info:
        load_normalization(path)
    assert "norm.json" in str(info.value)


def test_normalisation_file_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "norm.json"
    path.write_text("mean = [0, 0]")
    with pytest.raises(BundleError, match="cannot read normalisation file"):
        load_normalization(path)
    with pytest.raises(BundleError, match="cannot read normalisation file"):
        load_normalization(tmp_path / "absent.json")


def test_channel_order_that_is_not_a_list_is_refused(tmp_path: Path) -> None:
    """`"channel_order": 9` crashes with TypeError (tuple(9)) instead of a BundleError."""
    path = write_json(tmp_path / "norm.json", {"mean": MEAN, "std": STD, "channel_order": 9})
    with pytest.raises(BundleError, match="channel_order"):
        load_normalization(path)


def test_normalisation_with_another_method_is_refused(tmp_path: Path) -> None:
    """A model_config.json saying min-max must not be applied as a z-score."""
    body = {"normalization": {"method": "min_max", "mean": MEAN, "std": STD}}
    with pytest.raises(BundleError, match="min_max"):
        load_normalization(write_json(tmp_path / "model_config.json", body))


def test_normalizer_applies_z_score_per_channel() -> None:
    mean = np.array(MEAN, dtype=np.float32)
    std = np.array(STD, dtype=np.float32)
    raw = raw_windows(4, seed=5) + mean
    got = Normalizer(Normalization(mean=MEAN, std=STD)).apply(raw)
    want = (raw.astype(np.float64) - mean.astype(np.float64)) / std.astype(np.float64)
    assert got.dtype == np.float32
    assert got.shape == raw.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_normalizer_is_exact_when_the_arithmetic_is() -> None:
    mean = [0.0, 1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0, 8.0]
    std = [1.0, 2.0, 4.0, 0.5, 0.25, 8.0, 16.0, 32.0, 64.0]
    raw = np.arange(2 * 9, dtype=np.float32).reshape(2, 9)
    got = Normalizer(Normalization(mean=mean, std=std)).apply(raw)
    np.testing.assert_array_equal(got, (raw - np.array(mean)) / np.array(std))


# --- calibration ----------------------------------------------------------------------------------


def message(x: FloatArray, seq: int) -> dict[str, Any]:
    return {"x": x.tolist(), "seq": seq}


def test_calibration_from_npy(tmp_path: Path) -> None:
    windows = raw_windows(20)
    np.save(tmp_path / "calib.npy", windows.astype(np.float64))
    calib = load_calibration(tmp_path / "calib.npy")
    assert calib.windows.dtype == np.float32
    np.testing.assert_array_equal(calib.windows, windows)
    assert calib.labels is None
    assert calib.source == "calib.npy"


def test_calibration_from_npz_with_labels(calibration_npz: Path) -> None:
    calib = load_calibration(calibration_npz)
    assert calib.windows.shape == (36, WINDOW_LENGTH, CHANNELS)
    assert calib.labels is not None
    assert len(calib.labels) == 36
    assert calib.labels[0] == "rest"
    assert all(isinstance(label, str) for label in calib.labels)


def test_calibration_from_npz_x_without_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", x=raw_windows(13))
    calib = load_calibration(tmp_path / "c.npz")
    assert calib.windows.shape == (13, WINDOW_LENGTH, CHANNELS)
    assert calib.labels is None


def test_calibration_from_jsonl(tmp_path: Path) -> None:
    windows = raw_windows(12)
    lines = [
        orjson.dumps(message(windows[0], 0)),
        orjson.dumps({"topic": "imu/s1/window", "payload": message(windows[1], 1)}),
        b"",
        orjson.dumps({"payload": {"x": windows[2].tolist()}}),
        *(orjson.dumps(message(windows[i], i)) for i in range(3, 12)),
    ]
    path = tmp_path / "rec.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    calib = load_calibration(path)
    np.testing.assert_array_equal(calib.windows, windows)
    assert calib.source == "rec.jsonl"


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("bad.jsonl", b'{"x": [[1, 2, 3]]}\n', r"bad\.jsonl:1: not a window message"),
        ("bad.jsonl", b"{not json\n", r"bad\.jsonl:1: not a window message"),
        ("empty.jsonl", b"\n", r"has 0 windows; the motif head needs at least 12"),
        ("calib.csv", b"1,2,3\n", r"must be \.npy, \.npz or \.jsonl"),
        ("calib.npy", b"not an npy", "cannot read calibration file"),
    ],
)
def test_unreadable_calibration_is_refused(
    tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BundleError, match=expected):
        load_calibration(path)


@pytest.mark.parametrize(
    "shape", [(20, WINDOW_LENGTH, 8), (20, 99, CHANNELS), (WINDOW_LENGTH, CHANNELS)]
)
def test_calibration_with_wrong_shape_is_refused(tmp_path: Path, shape: tuple[int, ...]) -> None:
    np.save(tmp_path / "c.npy", np.zeros(shape, dtype=np.float32))
    with pytest.raises(BundleError, match="expected \\(N, 100, 9\\)"):
        load_calibration(tmp_path / "c.npy")


@pytest.mark.parametrize("count", [0, 1, 11])
def test_calibration_with_fewer_windows_than_motifs_is_refused(tmp_path: Path, count: int) -> None:
    np.save(tmp_path / "c.npy", raw_windows(count) if count else np.zeros((0, 100, 9), np.float32))
    with pytest.raises(BundleError, match=f"has {count} windows; the motif head needs at least 12"):
        load_calibration(tmp_path / "c.npy")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_calibration_with_non_finite_values_is_refused(tmp_path: Path, bad: float) -> None:
    windows = raw_windows(20)
    windows[7, 50, 3] = bad
    np.save(tmp_path / "c.npy", windows)
    with pytest.raises(BundleError, match="NaN or infinity"):
        load_calibration(tmp_path / "c.npy")


def test_calibration_npz_without_windows_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "c.npz", data=raw_windows(20))
    with pytest.raises(BundleError, match="no 'windows' or 'x' array"):
        load_calibration(tmp_path / "c.npz")


def test_calibration_labels_must_match_the_windows(tmp_path: Path) -> None:
    """20 windows with 5 labels load fine; naming the prototypes then indexes past the labels
    (IndexError out of build_bundle) instead of a BundleError about the label count."""
    np.savez(tmp_path / "c.npz", windows=raw_windows(20), labels=np.array(["walk"] * 5))
    onnx_path = write_onnx(tmp_path, "m.onnx", build_reference_onnx())
    with pytest.raises(BundleError, match="label"):
        build_bundle(
            onnx_path=onnx_path,
            name="labels",
            version="1.0.0",
            out=tmp_path / "labels.tar",
            calibration=tmp_path / "c.npz",
        )


def test_build_with_too_few_calibration_windows_raises_bundle_error(tmp_path: Path) -> None:
    """load_calibration's own message says N >= 12, but 5 windows pass and k-means then raises
    a bare ValueError out of build_bundle."""
    np.save(tmp_path / "c.npy", raw_windows(5))
    onnx_path = write_onnx(tmp_path, "m.onnx", build_reference_onnx())
    with pytest.raises(BundleError, match="12"):
        build_bundle(
            onnx_path=onnx_path,
            name="few",
            version="1.0.0",
            out=tmp_path / "few.tar",
            calibration=tmp_path / "c.npy",
        )


# --- golden check ---------------------------------------------------------------------------------


def test_good_bundle_passes_its_golden_check(reference_bundle: Bundle) -> None:
    pipeline = load_model(reference_bundle, "onnx", BackendOptions())
    try:
        report = pipeline.golden_check()
        assert report.passed
        assert report.count == reference_bundle.manifest.golden.count
        assert report.max_abs_error <= reference_bundle.manifest.golden.atol
        assert report.min_cosine >= reference_bundle.manifest.golden.min_cosine
    finally:
        pipeline.close()


@pytest.mark.parametrize("delta", [1e-3, 0.5])
def test_altered_golden_latents_fail_and_close_the_backend(
    reference_bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, delta: float
) -> None:
    files = dict(reference_bundle.files)
    golden = reference_bundle.manifest.golden
    _, latents = reference_bundle.golden()
    files[golden.latents] = npy_bytes(latents + np.float32(delta))
    manifest = reference_bundle.manifest.model_copy(update={"files": file_entries(files)})
    write_bundle(tmp_path / "altered.tar", manifest, files)
    altered = read_bundle(tmp_path / "altered.tar")

    opened: list[InferenceBackend] = []
    real_open = pipeline_module.open_backend

    def recording_open(name: str, bundle: Bundle, options: BackendOptions) -> InferenceBackend:
        backend = real_open(name, bundle, options)
        opened.append(backend)
        return backend

    monkeypatch.setattr(pipeline_module, "open_backend", recording_open)
    with pytest.raises(GoldenCheckError, match="failed its golden check"):
        load_model(altered, "onnx", BackendOptions())
    (backend,) = opened
    with pytest.raises(BackendError, match="closed"):
        backend.infer(np.zeros((1, WINDOW_LENGTH, CHANNELS), np.float32))


def test_golden_files_with_wrong_shape_are_refused(
    reference_bundle: Bundle, tmp_path: Path
) -> None:
    files = dict(reference_bundle.files)
    golden = reference_bundle.manifest.golden
    _, latents = reference_bundle.golden()
    files[golden.latents] = npy_bytes(latents[:, :32])
    manifest = reference_bundle.manifest.model_copy(update={"files": file_entries(files)})
    write_bundle(tmp_path / "shape.tar", manifest, files)
    with pytest.raises(BundleError, match="golden vectors have shapes"):
        read_bundle(tmp_path / "shape.tar").golden()


# --- k-means --------------------------------------------------------------------------------------


def blobs(seed: int = 0) -> tuple[FloatArray, FloatArray, NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0], [20, 0, 0], [0, 20, 0], [0, 0, 20], [20, 20, 20]], float)
    truth = np.repeat(np.arange(len(centres)), 40)
    points = centres[truth] + rng.normal(scale=0.3, size=(len(truth), 3))
    order = rng.permutation(len(truth))
    return points[order].astype(np.float32), centres.astype(np.float32), truth[order]


def test_kmeans_is_deterministic_for_a_seed() -> None:
    points = np.random.default_rng(1).standard_normal((200, 8)).astype(np.float32)
    first = kmeans(points, 12, seed=4)
    second = kmeans(points, 12, seed=4)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[0].shape == (12, 8)
    assert first[0].dtype == np.float32
    assert first[1].shape == (200,)


def test_kmeans_recovers_separated_blobs() -> None:
    points, centres, truth = blobs()
    for seed in range(5):
        found, labels = kmeans(points, len(centres), seed=seed)
        distance = np.linalg.norm(found[:, None, :] - centres[None, :, :], axis=2)
        assert sorted(distance.argmin(axis=1).tolist()) == list(range(len(centres)))
        assert distance.min(axis=1).max() < 0.2
        for cluster in range(len(centres)):  # the partition is the true one
            assert len(set(truth[labels == cluster].tolist())) == 1


@settings(deadline=None, max_examples=60)
@given(
    seed=st.integers(0, 2**32 - 1),
    k=st.integers(1, 12),
    n=st.integers(12, 60),
    values=st.integers(2, 6),
)
def test_kmeans_always_returns_k_distinct_centroids(seed: int, k: int, n: int, values: int) -> None:
    """Coarse grids of points (many duplicates, many empty clusters) still give k centroids."""
    points = np.random.default_rng(seed).integers(0, values, size=(n, 2)).astype(np.float32)
    distinct = len(np.unique(points, axis=0))
    if distinct < k:
        with pytest.raises(ValueError, match=f"at least {k} distinct points"):
            kmeans(points, k, seed=seed)
        return
    centroids, labels = kmeans(points, k, seed=seed)
    assert centroids.shape == (k, 2)
    assert np.isfinite(centroids).all()
    assert labels.shape == (n,)
    assert ((labels >= 0) & (labels < k)).all()
    assert len(np.unique(centroids, axis=0)) == k


def test_kmeans_with_fewer_distinct_points_than_k_raises() -> None:
    points = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)
    with pytest.raises(ValueError, match="at least 4 distinct points, got 3"):
        kmeans(points, 4)
    centroids, _ = kmeans(points, 3)
    assert len(np.unique(centroids, axis=0)) == 3


def test_motif_names_come_from_the_manifest_or_else_the_motif_head(tmp_path: Path) -> None:
    """The operator's report: motif names were missing on the dashboard for bundles that carry
    them in their motif head (the node published only `motif_labels`)."""
    manifest = read_bundle(build_reference_bundle(tmp_path / "ref.tar")).manifest
    head = manifest.motif_head
    assert head is not None
    names = [f"act-{i}" for i in range(12)]
    in_head = manifest.model_copy(update={"motif_head": head.model_copy(update={"labels": names})})
    assert in_head.shown_labels == names
    both = in_head.model_copy(update={"motif_labels": ["x"] * 12})
    assert both.shown_labels == ["x"] * 12  # the manifest's own names win
    bad = manifest.model_copy(
        update={"motif_head": head.model_copy(update={"labels": ["\x1b[31m"] * 12})}
    )
    assert bad.shown_labels is None  # not a valid name per motif: numbers, never junk
    short = manifest.model_copy(update={"motif_head": head.model_copy(update={"labels": ["a"]})})
    assert short.shown_labels is None
