"""The stand-in DFC's exceptions (names from Hailo's public tracebacks; hierarchy stand-in-only)."""

from __future__ import annotations


class SDKStandinError(Exception):
    """Base of the stand-in's errors (stand-in-only name; the real hierarchy is unknown)."""


class UnsupportedModelError(SDKStandinError):
    """The ONNX model cannot be translated (unreadable, or a graph the stand-in cannot cut)."""


class MisspellNodeError(SDKStandinError):
    """A start/end node name is not in the ONNX graph."""


class UnsupportedShapeError(SDKStandinError):
    """`net_input_shapes` does not fit the model's input."""


class BadInputsShape(SDKStandinError):  # noqa: N818 (the DFC's name)
    """Calibration or inference data is not float32 NHWC of the network's input shape."""


class InvalidStateError(SDKStandinError):
    """A runner method was called before the step it depends on (translate, optimize)."""


class ModelScriptParsingError(SDKStandinError):
    """A model script (.alls) line is not a known command call."""


class BackendAllocatorException(SDKStandinError):  # noqa: N818 (the DFC's name)
    """Compilation failed (the stand-in raises it only under `compile_error=1`)."""


class HardwareUnavailableError(SDKStandinError):
    """SDK_HAILO_HW needs a Hailo device, which the stand-in never has."""
