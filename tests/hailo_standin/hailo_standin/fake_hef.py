"""The file format of the stand-in HEFs: what the compiler stand-in writes and the runtime reads.

A real HEF is a binary produced by Hailo's Dataflow Compiler. Ours carries what the runtime
stand-in needs to behave like a device running that HEF: the network group name, the target
architecture, per-stream names, per-frame shapes, orders and quantisation, and the ONNX twin it
runs underneath. Stream names follow Hailo's `<network>/<layer>` style and never equal the ONNX
names, so code that takes names from the ONNX instead of the HEF fails against it.

Layout: `FAKEHEF1` + 4-byte little-endian header length + JSON header + ONNX bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import orjson

MAGIC = b"FAKEHEF1"


@dataclass(frozen=True)
class StreamSpec:
    """One input or output vstream of the HEF."""

    name: str
    shape: list[int]
    """Per-frame shape, no batch dimension: [H, W, C] for NHWC, [F] for NC."""
    order: str
    """`NHWC` or `NC`."""
    qp_scale: float = 1.0
    qp_zp: float = 0.0
    onnx_name: str = ""
    """The ONNX tensor this stream maps to."""


@dataclass(frozen=True)
class FakeHef:
    """Everything in a stand-in HEF."""

    network_group: str
    hw_arch: str
    inputs: list[StreamSpec]
    outputs: list[StreamSpec]
    onnx: bytes
    quantized: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def uint8_quantization(low: float, high: float) -> tuple[float, int]:
    """uint8 scale and zero point covering [low, high], as the compiler's optimiser sets them."""
    scale = (high - low) / 255.0 if high > low else 1.0
    return scale, round(-low / scale)


def make_hef(
    onnx: bytes,
    *,
    onnx_input: str,
    onnx_outputs: dict[str, int],
    hw_arch: str = "hailo8",
    network_group: str = "tcn",
    output_ranges: dict[str, tuple[float, float]] | None = None,
    quantized: bool = True,
) -> bytes:
    """A stand-in HEF for an ONNX model with input [1, 100, 9] and outputs of the given sizes.

    `output_ranges` (per ONNX output name: min, max seen on calibration data) sets each output's
    uint8 quantisation, as the compiler's optimisation step would; without it the scale covers
    [-16, 16].
    """
    ranges = output_ranges or {}
    outputs = []
    for index, (onnx_name, size) in enumerate(onnx_outputs.items(), start=1):
        scale, zero_point = uint8_quantization(*ranges.get(onnx_name, (-16.0, 16.0)))
        outputs.append(
            StreamSpec(
                name=f"{network_group}/fc{index}",
                shape=[size],
                order="NC",
                qp_scale=scale,
                qp_zp=zero_point,
                onnx_name=onnx_name,
            )
        )
    inputs = [
        StreamSpec(
            name=f"{network_group}/input_layer1",
            shape=[1, 100, 9],
            order="NHWC",
            qp_scale=8.0 / 255.0,
            qp_zp=128.0,
            onnx_name=onnx_input,
        )
    ]
    hef = FakeHef(network_group, hw_arch, inputs, outputs, onnx, quantized)
    return encode_hef(hef)


def encode_hef(hef: FakeHef) -> bytes:
    """Serialise a FakeHef."""
    header = orjson.dumps(
        {
            "network_group": hef.network_group,
            "hw_arch": hef.hw_arch,
            "quantized": hef.quantized,
            "inputs": [s.__dict__ for s in hef.inputs],
            "outputs": [s.__dict__ for s in hef.outputs],
            "extra": hef.extra,
        }
    )
    return MAGIC + struct.pack("<I", len(header)) + header + hef.onnx


def parse_hef(data: bytes) -> FakeHef:
    """Read a stand-in HEF; raises ValueError when the bytes are not one."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4:
        msg = "not a HEF file (bad magic)"
        raise ValueError(msg)
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    header = orjson.loads(data[start : start + length])
    return FakeHef(
        network_group=header["network_group"],
        hw_arch=header["hw_arch"],
        quantized=header["quantized"],
        inputs=[StreamSpec(**s) for s in header["inputs"]],
        outputs=[StreamSpec(**s) for s in header["outputs"]],
        onnx=data[start + length :],
        extra=header.get("extra", {}),
    )
