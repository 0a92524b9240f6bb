"""`HEF`: the stand-in HEF (tests/hailo_standin/hailo_standin/fake_hef.py) behind the real API.

Mirrors HailoRT 4.23's `HEF` (hailo-notes.md section 2): built from a str path or `bytes`
only (anything else, pathlib.Path included, is a ValueError), bytes that are not a HEF raise
`HailoRTInvalidHEFException`, vstream infos carry `.name`, `.shape` as a TUPLE without batch,
`.format` (the device format: UINT8 and the HEF's order), `.quant_info`, `.direction`,
`.network_name`. The HEF's target architecture is not readable from Python (as in the real one);
it is checked only at configure time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hailo_platform.pyhailort._common import (
    MODULE,
    Format,
    FormatOrder,
    FormatType,
    HailoRTException,
    HailoStreamDirection,
    HefSourceTypeError,
    QuantInfo,
    status_error,
)
from hailo_standin.fake_hef import FakeHef, StreamSpec, parse_hef

DEFAULT_BOTTLENECK_FPS = 8000.0
"""What `bottleneck_fps()` reports unless the HEF's `extra` says otherwise (arbitrary, fixed)."""


@dataclass(frozen=True)
class VStreamInfo:
    """`_pyhailort.VStreamInfo`."""

    name: str
    shape: tuple[int, ...]
    format: Format
    quant_info: QuantInfo
    direction: HailoStreamDirection
    network_name: str


VStreamInfo.__module__ = MODULE


def load_hef_bytes(hef_source: Any) -> tuple[bytes, str | None]:
    """The bytes of a HEF source (str path or bytes), as `Hef.create_from_file/_buffer` read."""
    if isinstance(hef_source, bytes):
        return hef_source, None
    if isinstance(hef_source, str):
        try:
            with open(hef_source, "rb") as handle:
                return handle.read(), hef_source
        except OSError as exc:
            raise status_error(13, f"Failed to open HEF file {hef_source}: {exc}") from exc
    msg = "HEF can only be created from a file path (str) or a buffer (bytes)"
    raise HefSourceTypeError(msg)


def parse_hef_bytes(data: bytes) -> FakeHef:
    """Parse, or raise HailoRTInvalidHEFException like `Hef::create` on a corrupt file."""
    try:
        hef = parse_hef(data)
    except (ValueError, KeyError, TypeError) as exc:
        raise status_error(26, f"HEF parse failed: {exc}") from exc
    if not hef.inputs or not hef.outputs:
        raise status_error(26, "HEF has no input or no output vstream")
    return hef


def stream_order(spec: StreamSpec) -> FormatOrder:
    """The device order of a stream (`NHWC`, `NC`, `NHW`, ...)."""
    try:
        return FormatOrder[spec.order]
    except KeyError as exc:
        raise status_error(26, f"unknown format order {spec.order!r} in HEF") from exc


def stream_quant(spec: StreamSpec) -> QuantInfo:
    return QuantInfo.uint8(spec.qp_zp, spec.qp_scale)


def vstream_info(hef: FakeHef, spec: StreamSpec, direction: HailoStreamDirection) -> VStreamInfo:
    return VStreamInfo(
        name=spec.name,
        shape=tuple(int(d) for d in spec.shape),
        format=Format(FormatType.UINT8, stream_order(spec)),
        quant_info=stream_quant(spec),
        direction=direction,
        network_name=f"{hef.network_group}/{hef.network_group}",
    )


class HEF:
    """Python representation of the Hailo Executable Format (the stand-in's)."""

    def __init__(self, hef_source: str | bytes) -> None:
        data, self._path = load_hef_bytes(hef_source)
        self._hef = parse_hef_bytes(data)

    @property
    def path(self) -> str | None:
        """HEF file path (None when built from bytes)."""
        return self._path

    def _check_group(self, name: str | None) -> None:
        if name not in (None, "", self._hef.network_group, self._network_name()):
            raise status_error(61, f"network group {name!r} not in HEF")

    def _network_name(self) -> str:
        return f"{self._hef.network_group}/{self._hef.network_group}"

    def get_network_group_names(self) -> list[str]:
        return [self._hef.network_group]

    def get_networks_names(self, network_group_name: str | None = None) -> list[str]:
        self._check_group(network_group_name)
        return [self._network_name()]

    def get_input_vstream_infos(self, name: str | None = None) -> list[VStreamInfo]:
        self._check_group(name)
        return [vstream_info(self._hef, s, HailoStreamDirection.H2D) for s in self._hef.inputs]

    def get_output_vstream_infos(self, name: str | None = None) -> list[VStreamInfo]:
        self._check_group(name)
        return [vstream_info(self._hef, s, HailoStreamDirection.D2H) for s in self._hef.outputs]

    def get_all_vstream_infos(self, name: str | None = None) -> list[VStreamInfo]:
        return [*self.get_input_vstream_infos(name), *self.get_output_vstream_infos(name)]

    def get_sorted_output_names(self, network_group_name: str | None = None) -> list[str]:
        self._check_group(network_group_name)
        return [s.name for s in self._hef.outputs]

    def bottleneck_fps(self, network_group_name: str | None = None) -> float:
        self._check_group(network_group_name)
        fps = float(self._hef.extra.get("bottleneck_fps", DEFAULT_BOTTLENECK_FPS))
        if fps == 0:
            msg = "bottleneck_fps is zero"
            raise HailoRTException(msg)
        return fps


HEF.__module__ = MODULE
