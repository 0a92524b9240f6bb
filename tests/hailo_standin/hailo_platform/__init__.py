"""Stand-in for HailoRT's `hailo_platform` package (4.23, InferModel API), for tests only.

It keeps the real package's module layout (`hailo_platform.pyhailort.pyhailort`) and exports
exactly what the real `__init__` does (hailo-notes.md section 1, PYINIT); every other exception
class is imported from `hailo_platform.pyhailort.pyhailort`. Underneath, the HEF's ONNX twin runs
in onnxruntime; faults come from `hailo_standin.faults` (or the HAILO_STANDIN variable).
"""

from hailo_platform.pyhailort import _pyhailort
from hailo_platform.pyhailort.pyhailort import (
    HEF,
    AsyncInferJob,
    ConfigureParams,
    Device,
    FormatOrder,
    FormatType,
    HailoCommunicationClosedException,
    HailoRTException,
    HailoRTStreamAbortedByUser,
    HailoSchedulingAlgorithm,
    HailoStreamInterface,
    InferVStreams,
    InputVStreamParams,
    OutputVStreamParams,
    VDevice,
)

__version__ = "4.23.0"

if __version__ != _pyhailort.__version__:  # as the real package checks its compiled half
    msg = (
        f"_pyhailort version ({_pyhailort.__version__}) does not match pyhailort version "
        f"({__version__})"
    )
    raise ImportError(msg)

__all__ = [
    "HEF",
    "AsyncInferJob",
    "ConfigureParams",
    "Device",
    "FormatOrder",
    "FormatType",
    "HailoCommunicationClosedException",
    "HailoRTException",
    "HailoRTStreamAbortedByUser",
    "HailoSchedulingAlgorithm",
    "HailoStreamInterface",
    "InferVStreams",
    "InputVStreamParams",
    "OutputVStreamParams",
    "VDevice",
]
