"""Built-in reference model: a small, deterministic TCN encoder written straight to ONNX.

This is not a trained model. It exists so that tests and ``imu-node demo`` have a real ONNX
graph to run without torch, network access or a model download. It is a stand-in with the
same I/O contract as the real TCN-VAE encoder deployed on the nodes:

* ONNX opset 11, IR version 7,
* input ``imu_window`` of shape ``[1, 100, 9]`` float32 (100 samples of a z-score normalised
  9-axis IMU: accel xyz, gyro xyz, mag xyz),
* output ``latent`` of shape ``[1, 64]`` float32.

Architecture (channels-first after an initial transpose)::

    [N,100,9] -Transpose-> [N,9,100]
    block 1: Conv1d(9->32, k=3, dilation=1, same pad) -> Relu
    block b in 2..4: Relu(Conv1d(32->32, k=3, dilation=2**(b-1), same pad) + input)
    GlobalAveragePool (time) ++ ReduceMax (time) -> Concat [N,64,1] -> Flatten [N,64]
    Gemm(64->64, transB=1) -> [N,64]

Weights come from ``np.random.default_rng(seed)`` with He/Kaiming scaling, so the same seed
always yields a byte-identical model. :func:`reference_forward` is a pure-numpy
implementation of the same network, used by tests to check what the ONNX graph computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from common.errors import MissingExtraError
from schemas.limits import CHANNELS, LATENT_DIM, WINDOW_LENGTH

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ModuleNotFoundError as missing:  # the node image: it serves bundles, never writes ONNX
    raise MissingExtraError("onnx", extra="fleet", needed_for="the reference model") from missing

__all__ = [
    "DILATIONS",
    "HIDDEN_CHANNELS",
    "KERNEL_SIZE",
    "OPSET",
    "REFERENCE_SEED",
    "ReferenceWeights",
    "build_reference_onnx",
    "make_reference_weights",
    "reference_forward",
]

REFERENCE_SEED: int = 7
"""Seed of the reference weights shipped with tests and the demo."""

OPSET: int = 11
IR_VERSION: int = 7
INPUT_FEATURES: int = CHANNELS
HIDDEN_CHANNELS: int = 32
KERNEL_SIZE: int = 3
DILATIONS: tuple[int, ...] = (1, 2, 4, 8)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True, eq=False)
class ReferenceWeights:
    """Float32 weights of the reference TCN encoder.

    ``conv_weights[i]`` has ONNX ``Conv`` layout ``(out_channels, in_channels, kernel)``;
    ``dense_weight`` has layout ``(out_features, in_features)`` (used with ``transB=1``).
    ``eq=False`` because element-wise array comparison has no single truth value.
    """

    seed: int
    conv_weights: tuple[FloatArray, ...]
    conv_biases: tuple[FloatArray, ...]
    dense_weight: FloatArray
    dense_bias: FloatArray


def make_reference_weights(seed: int = REFERENCE_SEED) -> ReferenceWeights:
    """Draw deterministic weights from ``np.random.default_rng(seed)``.

    Block 1 uses He scaling (std ``sqrt(2 / fan_in)``, it feeds a Relu). The residual blocks use
    half the He variance (std ``sqrt(1 / fan_in)``) because the skip path already carries the
    signal; with full He gain the activation rms grows ~1.5x per block. The dense head uses half
    the LeCun std (``0.5 * sqrt(1 / fan_in)``) because max-pooled features are ~3x the activation
    rms. For z-scored inputs this keeps block activations at rms ~1-2 and the latent at rms ~2.
    Biases are small (std 0.05).
    """
    rng = np.random.default_rng(seed)
    conv_weights: list[FloatArray] = []
    conv_biases: list[FloatArray] = []
    in_ch = INPUT_FEATURES
    for i in range(len(DILATIONS)):
        fan_in = in_ch * KERNEL_SIZE
        gain = 2.0 if i == 0 else 1.0
        w = rng.standard_normal((HIDDEN_CHANNELS, in_ch, KERNEL_SIZE)) * np.sqrt(gain / fan_in)
        conv_weights.append(w.astype(np.float32))
        conv_biases.append((rng.standard_normal(HIDDEN_CHANNELS) * 0.05).astype(np.float32))
        in_ch = HIDDEN_CHANNELS
    pooled = 2 * HIDDEN_CHANNELS
    dense_w = rng.standard_normal((LATENT_DIM, pooled)) * 0.5 * np.sqrt(1.0 / pooled)
    dense_b = rng.standard_normal(LATENT_DIM) * 0.05
    return ReferenceWeights(
        seed=seed,
        conv_weights=tuple(conv_weights),
        conv_biases=tuple(conv_biases),
        dense_weight=dense_w.astype(np.float32),
        dense_bias=dense_b.astype(np.float32),
    )


def _conv1d_same(x: FloatArray, w: FloatArray, b: FloatArray, dilation: int) -> FloatArray:
    """Dilated 1-D cross-correlation with symmetric zero padding, ``x`` is ``[N, C, T]``."""
    t = x.shape[2]
    pad = dilation * (w.shape[2] - 1) // 2
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad)))
    out = np.zeros((x.shape[0], w.shape[0], t), dtype=np.float32)
    for k in range(w.shape[2]):
        window = xp[:, :, k * dilation : k * dilation + t]
        out += np.einsum("oc,nct->not", w[:, :, k], window)
    out += b[None, :, None]
    return out


def reference_forward(weights: ReferenceWeights, x: npt.NDArray[np.floating]) -> FloatArray:
    """Pure-numpy forward pass of the reference encoder: ``(N, 100, 9)`` -> ``(N, 64)``."""
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim != 3 or arr.shape[1:] != (WINDOW_LENGTH, INPUT_FEATURES):
        msg = f"expected shape (N, {WINDOW_LENGTH}, {INPUT_FEATURES}), got {arr.shape}"
        raise ValueError(msg)
    h = arr.transpose(0, 2, 1)
    for i, dilation in enumerate(DILATIONS):
        y = _conv1d_same(h, weights.conv_weights[i], weights.conv_biases[i], dilation)
        if i > 0:
            y = y + h
        h = np.maximum(y, np.float32(0.0))
    pooled = np.concatenate([h.mean(axis=2), h.max(axis=2)], axis=1)
    out = pooled @ weights.dense_weight.T + weights.dense_bias
    return out.astype(np.float32)


def build_reference_onnx(
    weights: ReferenceWeights | None = None,
    *,
    batch: int | None = 1,
    input_name: str = "imu_window",
    output_name: str = "latent",
) -> bytes:
    """Build the reference encoder as serialized ONNX ``ModelProto`` bytes (opset 11, IR 7).

    ``batch=None`` makes the batch dimension symbolic (``"batch"``). Defaults to the weights of
    :data:`REFERENCE_SEED`. The model passes ``onnx.checker.check_model`` before it is returned.
    """
    if weights is None:
        weights = make_reference_weights()
    if batch is not None and batch < 1:
        msg = f"batch must be >= 1 or None, got {batch}"
        raise ValueError(msg)
    if input_name == output_name:
        msg = "input_name and output_name must differ"
        raise ValueError(msg)
    batch_dim: int | str = "batch" if batch is None else batch

    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = [
        helper.make_node(
            "Transpose", [input_name], ["x_nct"], name="to_channels_first", perm=[0, 2, 1]
        )
    ]
    h = "x_nct"
    for i, dilation in enumerate(DILATIONS):
        blk = f"block{i + 1}"
        w_name, b_name = f"{blk}.conv.weight", f"{blk}.conv.bias"
        initializers.append(numpy_helper.from_array(weights.conv_weights[i], w_name))
        initializers.append(numpy_helper.from_array(weights.conv_biases[i], b_name))
        conv_out = f"{blk}.conv"
        nodes.append(
            helper.make_node(
                "Conv",
                [h, w_name, b_name],
                [conv_out],
                name=f"{blk}/Conv",
                kernel_shape=[KERNEL_SIZE],
                dilations=[dilation],
                pads=[dilation, dilation],
                strides=[1],
                group=1,
            )
        )
        relu_in = conv_out
        if i > 0:
            relu_in = f"{blk}.residual"
            nodes.append(helper.make_node("Add", [conv_out, h], [relu_in], name=f"{blk}/Add"))
        relu_out = f"{blk}.out"
        nodes.append(helper.make_node("Relu", [relu_in], [relu_out], name=f"{blk}/Relu"))
        h = relu_out

    initializers.append(numpy_helper.from_array(weights.dense_weight, "head.weight"))
    initializers.append(numpy_helper.from_array(weights.dense_bias, "head.bias"))
    nodes += [
        helper.make_node("GlobalAveragePool", [h], ["pool.mean"], name="pool/Mean"),
        helper.make_node("ReduceMax", [h], ["pool.max"], name="pool/Max", axes=[2], keepdims=1),
        helper.make_node(
            "Concat", ["pool.mean", "pool.max"], ["pool.cat"], name="pool/Concat", axis=1
        ),
        helper.make_node("Flatten", ["pool.cat"], ["pool.flat"], name="pool/Flatten", axis=1),
        helper.make_node(
            "Gemm",
            ["pool.flat", "head.weight", "head.bias"],
            [output_name],
            name="head/Gemm",
            transB=1,
        ),
    ]

    graph = helper.make_graph(
        nodes,
        "tcn_reference",
        [
            helper.make_tensor_value_info(
                input_name, TensorProto.FLOAT, [batch_dim, WINDOW_LENGTH, INPUT_FEATURES]
            )
        ],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch_dim, LATENT_DIM])],
        initializer=initializers,
        doc_string=(
            "imu-edge reference TCN encoder (untrained, seeded weights): 4 dilated Conv1d blocks "
            "(9->32 ch, dilations 1/2/4/8, residual on blocks 2-4), mean+max pooling over time, "
            f"Gemm to a {LATENT_DIM}-d latent. Stand-in for the TCN-VAE encoder, same I/O contract."
        ),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    model.producer_name = "imu-edge"
    helper.set_model_props(model, {"model_name": "tcn-reference", "seed": str(weights.seed)})
    onnx.checker.check_model(model, full_check=True)
    data: bytes = model.SerializeToString()
    return data
