"""Stand-in for `hailo_platform.pyhailort.pyhailort` (HailoRT 4.23): every class and exception.

Tests only. Same module path, class, method and exception names as the real module, with the
behaviour of a Hailo-8 described in shared/hailo-notes.md, running the HEF's ONNX twin in
onnxruntime. Its faults are set through `hailo_standin.faults` (not part of the real API).
The old vstream API (ConfigureParams, InputVStreamParams, OutputVStreamParams, InferVStreams)
exists by name only and raises NotImplementedError when used.
"""

from __future__ import annotations

from typing import Any, NoReturn

from hailo_platform.pyhailort._common import (
    MODULE,
    DeviceArchitectureTypes,
    ExceptionWrapper,
    Format,
    FormatFlags,
    FormatOrder,
    FormatType,
    HailoCommunicationClosedException,
    HailoRTDriverOperationFailedException,
    HailoRTEthException,
    HailoRTException,
    HailoRTFirmwareControlFailedException,
    HailoRTHEFNotCompatibleWithDevice,
    HailoRTInvalidArgumentException,
    HailoRTInvalidFrameException,
    HailoRTInvalidHEFException,
    HailoRTInvalidOperationException,
    HailoRTNetworkGroupNotActivatedException,
    HailoRTNotFoundException,
    HailoRTPCIeDriverException,
    HailoRTStreamAborted,
    HailoRTStreamAbortedByUser,
    HailoRTTimeout,
    HailoRTUnsupportedOpcodeException,
    HailoSchedulingAlgorithm,
    HailoStatusInvalidValueException,
    HailoStreamDirection,
    HailoStreamInterface,
    InvalidProtocolVersionException,
    PowerMode,
    QuantInfo,
    UdpRecvError,
    get_status_message,
)
from hailo_platform.pyhailort._device import (
    BOARD_INFO_NOT_CONFIGURED_ATTR,
    HAILO_UNIQUE_VDEVICE_GROUP_ID,
    BoardInformation,
    Control,
    Device,
    TemperatureInfo,
    VDevice,
    VDeviceParams,
)
from hailo_platform.pyhailort._engine import AsyncInferCompletionInfo
from hailo_platform.pyhailort._hef import HEF, VStreamInfo
from hailo_platform.pyhailort._infer_model import AsyncInferJob, ConfiguredInferModel, InferModel

DEFAULT_VSTREAM_TIMEOUT_MS = 10000
DEFAULT_VSTREAM_QUEUE_SIZE = 2
HAILO_DEFAULT_BATCH_SIZE = 0


def _old_api(name: str) -> NoReturn:
    msg = (
        f"hailo_platform stand-in: {name} belongs to the old vstream API, which the stand-in "
        "does not implement; use the InferModel API (VDevice.create_infer_model)"
    )
    raise NotImplementedError(msg)


class ConfigureParams:
    """Old API: not implemented (raises NotImplementedError)."""

    @staticmethod
    def create_from_hef(hef: Any, interface: Any) -> NoReturn:
        _old_api("ConfigureParams.create_from_hef")


class InputVStreamParams:
    """Old API: not implemented (raises NotImplementedError)."""

    @staticmethod
    def make(configured_network: Any, *args: Any, **kwargs: Any) -> NoReturn:
        _old_api("InputVStreamParams.make")

    @staticmethod
    def make_from_network_group(configured_network: Any, *args: Any, **kwargs: Any) -> NoReturn:
        _old_api("InputVStreamParams.make_from_network_group")


class OutputVStreamParams:
    """Old API: not implemented (raises NotImplementedError)."""

    @staticmethod
    def make(configured_network: Any, *args: Any, **kwargs: Any) -> NoReturn:
        _old_api("OutputVStreamParams.make")

    @staticmethod
    def make_from_network_group(configured_network: Any, *args: Any, **kwargs: Any) -> NoReturn:
        _old_api("OutputVStreamParams.make_from_network_group")

    @staticmethod
    def make_groups(configured_network: Any, *args: Any, **kwargs: Any) -> NoReturn:
        _old_api("OutputVStreamParams.make_groups")


class InferVStreams:
    """Old API: not implemented (raises NotImplementedError)."""

    def __init__(self, configured_net_group: Any, *args: Any, **kwargs: Any) -> None:
        _old_api("InferVStreams")


for _cls in (ConfigureParams, InputVStreamParams, OutputVStreamParams, InferVStreams):
    _cls.__module__ = MODULE

__all__ = [
    "BOARD_INFO_NOT_CONFIGURED_ATTR",
    "DEFAULT_VSTREAM_QUEUE_SIZE",
    "DEFAULT_VSTREAM_TIMEOUT_MS",
    "HAILO_DEFAULT_BATCH_SIZE",
    "HAILO_UNIQUE_VDEVICE_GROUP_ID",
    "HEF",
    "AsyncInferCompletionInfo",
    "AsyncInferJob",
    "BoardInformation",
    "ConfigureParams",
    "ConfiguredInferModel",
    "Control",
    "Device",
    "DeviceArchitectureTypes",
    "ExceptionWrapper",
    "Format",
    "FormatFlags",
    "FormatOrder",
    "FormatType",
    "HailoCommunicationClosedException",
    "HailoRTDriverOperationFailedException",
    "HailoRTEthException",
    "HailoRTException",
    "HailoRTFirmwareControlFailedException",
    "HailoRTHEFNotCompatibleWithDevice",
    "HailoRTInvalidArgumentException",
    "HailoRTInvalidFrameException",
    "HailoRTInvalidHEFException",
    "HailoRTInvalidOperationException",
    "HailoRTNetworkGroupNotActivatedException",
    "HailoRTNotFoundException",
    "HailoRTPCIeDriverException",
    "HailoRTStreamAborted",
    "HailoRTStreamAbortedByUser",
    "HailoRTTimeout",
    "HailoRTUnsupportedOpcodeException",
    "HailoSchedulingAlgorithm",
    "HailoStatusInvalidValueException",
    "HailoStreamDirection",
    "HailoStreamInterface",
    "InferModel",
    "InferVStreams",
    "InputVStreamParams",
    "InvalidProtocolVersionException",
    "OutputVStreamParams",
    "PowerMode",
    "QuantInfo",
    "TemperatureInfo",
    "UdpRecvError",
    "VDevice",
    "VDeviceParams",
    "VStreamInfo",
    "get_status_message",
]
