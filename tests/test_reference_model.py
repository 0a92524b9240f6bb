"""Reference TCN encoder: the ONNX graph matches the numpy forward pass and the I/O contract."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from runtime.reference import (
    REFERENCE_SEED,
    ReferenceWeights,
    build_reference_onnx,
    make_reference_weights,
    reference_forward,
)


def _session(model: bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def _window(seed: int, n: int = 1) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((n, 100, 9)).astype(np.float32)


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_param if d.HasField("dim_param") else d.dim_value
        for d in value_info.type.tensor_type.shape.dim
    ]


@pytest.fixture(scope="module")
def weights() -> ReferenceWeights:
    return make_reference_weights()


@pytest.fixture(scope="module")
def session(weights: ReferenceWeights) -> ort.InferenceSession:
    return _session(build_reference_onnx(weights))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_onnx_matches_numpy_forward(
    weights: ReferenceWeights, session: ort.InferenceSession, seed: int
) -> None:
    x = _window(seed)
    (got,) = session.run(None, {"imu_window": x})
    np.testing.assert_allclose(got, reference_forward(weights, x), rtol=1e-4, atol=1e-4)


def test_onnx_matches_numpy_on_large_and_offset_input(
    weights: ReferenceWeights, session: ort.InferenceSession
) -> None:
    rng = np.random.default_rng(99)
    x = (rng.standard_normal((1, 100, 9)) * 3.0 + 1.5).astype(np.float32)
    (got,) = session.run(None, {"imu_window": x})
    np.testing.assert_allclose(got, reference_forward(weights, x), rtol=1e-4, atol=1e-4)


def test_io_contract_and_metadata() -> None:
    model = onnx.load_from_string(build_reference_onnx())
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 11)]
    assert model.ir_version == 7
    assert model.producer_name == "imu-edge"
    assert model.graph.doc_string
    props = {p.key: p.value for p in model.metadata_props}
    assert props == {"model_name": "tcn-reference", "seed": str(REFERENCE_SEED)}
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == "imu_window"
    assert out.name == "latent"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert _dims(inp) == [1, 100, 9]
    assert _dims(out) == [1, 64]
    onnx.checker.check_model(model, full_check=True)


def test_runtime_reports_contract(session: ort.InferenceSession) -> None:
    (inp,) = session.get_inputs()
    (out,) = session.get_outputs()
    assert inp.shape == [1, 100, 9]
    assert inp.type == "tensor(float)"
    assert out.shape == [1, 64]
    (got,) = session.run(None, {"imu_window": _window(0)})
    assert got.shape == (1, 64)
    assert got.dtype == np.float32
    assert np.all(np.isfinite(got))


def test_symbolic_batch_rows_match_batch_one(
    weights: ReferenceWeights, session: ort.InferenceSession
) -> None:
    model = build_reference_onnx(weights, batch=None)
    proto = onnx.load_from_string(model)
    assert _dims(proto.graph.input[0]) == ["batch", 100, 9]
    assert _dims(proto.graph.output[0]) == ["batch", 64]
    x = _window(11, n=5)
    (batched,) = _session(model).run(None, {"imu_window": x})
    assert batched.shape == (5, 64)
    for i in range(5):
        (single,) = session.run(None, {"imu_window": x[i : i + 1]})
        np.testing.assert_allclose(batched[i], single[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batched, reference_forward(weights, x), rtol=1e-4, atol=1e-4)


def test_fixed_batch_other_than_one() -> None:
    sess = _session(build_reference_onnx(batch=3))
    assert sess.get_inputs()[0].shape == [3, 100, 9]
    (got,) = sess.run(None, {"imu_window": _window(5, n=3)})
    assert got.shape == (3, 64)


@pytest.mark.parametrize("batch", [0, -1])
def test_invalid_batch_rejected(batch: int) -> None:
    with pytest.raises(ValueError, match="batch"):
        build_reference_onnx(batch=batch)


def test_custom_io_names(weights: ReferenceWeights) -> None:
    model = build_reference_onnx(weights, input_name="x", output_name="z")
    sess = _session(model)
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert [o.name for o in sess.get_outputs()] == ["z"]
    x = _window(3)
    (got,) = sess.run(["z"], {"x": x})
    np.testing.assert_allclose(got, reference_forward(weights, x), rtol=1e-4, atol=1e-4)


def test_same_seed_is_byte_identical() -> None:
    assert build_reference_onnx() == build_reference_onnx()
    assert build_reference_onnx(make_reference_weights(REFERENCE_SEED)) == build_reference_onnx()
    assert build_reference_onnx(make_reference_weights(3)) == build_reference_onnx(
        make_reference_weights(3)
    )


def test_different_seed_gives_different_weights() -> None:
    a, b = make_reference_weights(7), make_reference_weights(8)
    pairs = [
        *zip(a.conv_weights, b.conv_weights, strict=True),
        *zip(a.conv_biases, b.conv_biases, strict=True),
        (a.dense_weight, b.dense_weight),
        (a.dense_bias, b.dense_bias),
    ]
    for wa, wb in pairs:
        assert wa.shape == wb.shape
        assert not np.array_equal(wa, wb)
    assert build_reference_onnx(a) != build_reference_onnx(b)
    x = _window(0)
    assert not np.allclose(reference_forward(a, x), reference_forward(b, x))


def test_weight_shapes_and_dtypes(weights: ReferenceWeights) -> None:
    assert [w.shape for w in weights.conv_weights] == [(32, 9, 3)] + [(32, 32, 3)] * 3
    assert [b.shape for b in weights.conv_biases] == [(32,)] * 4
    assert weights.dense_weight.shape == (64, 64)
    assert weights.dense_bias.shape == (64,)
    arrays = [*weights.conv_weights, *weights.conv_biases, weights.dense_weight, weights.dense_bias]
    assert all(a.dtype == np.float32 for a in arrays)


def test_outputs_depend_on_input(session: ort.InferenceSession) -> None:
    outs = np.concatenate([session.run(None, {"imu_window": _window(s)})[0] for s in range(6)])
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            assert np.abs(outs[i] - outs[j]).max() > 1e-2
    assert np.all(outs.std(axis=0) > 0)
    zeros = session.run(None, {"imu_window": np.zeros((1, 100, 9), np.float32)})[0]
    assert np.abs(zeros - outs[0]).max() > 1e-2


def test_activations_stay_order_one(weights: ReferenceWeights) -> None:
    out = reference_forward(weights, _window(21, n=32))
    rms = float(np.sqrt(np.mean(out**2)))
    assert 0.1 < rms < 10.0


def test_numpy_forward_rejects_bad_shape(weights: ReferenceWeights) -> None:
    with pytest.raises(ValueError, match="shape"):
        reference_forward(weights, np.zeros((1, 9, 100), np.float32))
