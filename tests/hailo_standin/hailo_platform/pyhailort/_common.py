"""Exceptions, status codes, enums and small value types of the stand-in `pyhailort`.

Mirrors HailoRT 4.23's `pyhailort.py` (hailo-notes.md section 1, "Exceptions"): every Python
exception class derives from `HailoRTException(Exception)`; a libhailort status maps to one of
them through `ExceptionWrapper.create_exception_from_status` with the real messages, and any
other status becomes `HailoRTException("libhailort failed with error: N (NAME)")`. The detail
the real library writes to hailort.log goes to the `hailort` logger here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import IntEnum

MODULE = "hailo_platform.pyhailort.pyhailort"
log = logging.getLogger("hailort")
log.addHandler(logging.NullHandler())  # records propagate; no last-resort stderr print


class HailoRTException(Exception):  # noqa: N818 (the real name)
    """Base of all HailoRT Python exceptions."""


class InvalidProtocolVersionException(HailoRTException):
    pass


class HailoRTFirmwareControlFailedException(HailoRTException):
    pass


class HailoRTInvalidFrameException(HailoRTException):
    pass


class HailoRTUnsupportedOpcodeException(HailoRTException):
    pass


class HailoRTTimeout(HailoRTException):
    """HAILO_TIMEOUT (4). The real name: not `...TimeoutException`."""


class HailoRTStreamAborted(HailoRTException):
    """HAILO_STREAM_ABORT (63): what in-flight jobs get when the pipeline shuts down."""


class HailoRTStreamAbortedByUser(HailoRTException):
    pass


class HailoRTInvalidOperationException(HailoRTException):
    """HAILO_INVALID_OPERATION (6)."""


class HailoRTInvalidArgumentException(HailoRTException):
    """HAILO_INVALID_ARGUMENT (2)."""


class HailoRTNotFoundException(HailoRTException):
    """HAILO_NOT_FOUND (61)."""


class HailoRTInvalidHEFException(HailoRTException):
    """HAILO_INVALID_HEF (26)."""


class HailoRTHEFNotCompatibleWithDevice(HailoRTException):
    """HAILO_HEF_NOT_COMPATIBLE_WITH_DEVICE (93), new in 4.21."""


class HailoRTEthException(HailoRTException):
    pass


class HailoRTDriverOperationFailedException(HailoRTException):
    """HAILO_DRIVER_OPERATION_FAILED (36); called HailoRTPCIeDriverException before 4.20."""


HailoRTPCIeDriverException = HailoRTDriverOperationFailedException


class HailoRTNetworkGroupNotActivatedException(HailoRTException):
    """HAILO_NETWORK_GROUP_NOT_ACTIVATED (69)."""


class HailoCommunicationClosedException(HailoRTException):
    """HAILO_COMMUNICATION_CLOSED (62), new in 4.20."""


class UdpRecvError(HailoRTException):
    pass


class HailoStatusInvalidValueException(Exception):  # noqa: N818 (the real name)
    pass


# Where the real Python and C++ layers disagree, or the notes and the source do, the stand-in
# raises a class that satisfies both `except` clauses; its name is the real one.
EdgeNotFound = type(
    "HailoRTNotFoundException",
    (HailoRTNotFoundException, HailoRTInvalidArgumentException),
    {"__module__": MODULE, "__doc__": "A name that is not a model edge (NOT_FOUND in IMC)."},
)
HefSourceTypeError = type(
    "ValueError",
    (ValueError, TypeError),
    {"__module__": MODULE, "__doc__": "hef_source neither str nor bytes (pybind: TypeError)."},
)
UseAfterRelease = type(
    "HailoRTException",
    (HailoRTException, AttributeError),
    {"__module__": MODULE, "__doc__": "A released object used (the real one: AttributeError)."},
)

STATUS = {
    2: "HAILO_INVALID_ARGUMENT",
    4: "HAILO_TIMEOUT",
    6: "HAILO_INVALID_OPERATION",
    7: "HAILO_NOT_IMPLEMENTED",
    8: "HAILO_INTERNAL_FAILURE",
    13: "HAILO_OPEN_FILE_FAILURE",
    26: "HAILO_INVALID_HEF",
    36: "HAILO_DRIVER_OPERATION_FAILED",
    61: "HAILO_NOT_FOUND",
    62: "HAILO_COMMUNICATION_CLOSED",
    63: "HAILO_STREAM_ABORT",
    69: "HAILO_NETWORK_GROUP_NOT_ACTIVATED",
    74: "HAILO_OUT_OF_PHYSICAL_DEVICES",
    82: "HAILO_QUEUE_IS_FULL",
    93: "HAILO_HEF_NOT_COMPATIBLE_WITH_DEVICE",
}
_BY_NAME: dict[str, tuple[type[HailoRTException], str]] = {
    "HAILO_TIMEOUT": (
        HailoRTTimeout,
        "Received a timeout - hailort has failed because a timeout had occurred",
    ),
    "HAILO_STREAM_ABORT": (HailoRTStreamAborted, "Stream was aborted"),
    "HAILO_INVALID_OPERATION": (
        HailoRTInvalidOperationException,
        "Invalid operation. See hailort.log for more information",
    ),
    "HAILO_INVALID_ARGUMENT": (
        HailoRTInvalidArgumentException,
        "Invalid argument. See hailort.log for more information",
    ),
    "HAILO_NOT_FOUND": (
        HailoRTNotFoundException,
        "Item not found. See hailort.log for more information",
    ),
    "HAILO_INVALID_HEF": (
        HailoRTInvalidHEFException,
        "Invalid HEF. See hailort.log for more information",
    ),
    "HAILO_HEF_NOT_COMPATIBLE_WITH_DEVICE": (
        HailoRTHEFNotCompatibleWithDevice,
        "HEF file is not compatible with device. See hailort.log for more information",
    ),
    "HAILO_DRIVER_OPERATION_FAILED": (
        HailoRTDriverOperationFailedException,
        "Failure in hailort driver ioctl. run 'dmesg | grep hailo' for more information",
    ),
    "HAILO_COMMUNICATION_CLOSED": (
        HailoCommunicationClosedException,
        "Communication closed failure. Check server-client connection",
    ),
    "HAILO_NETWORK_GROUP_NOT_ACTIVATED": (
        HailoRTNetworkGroupNotActivatedException,
        "Network group is not activated",
    ),
}


def get_status_message(status_code: int) -> str:
    """The HAILO_* name of a status code (only the codes the stand-in produces)."""
    if status_code not in STATUS:
        msg = f"Value {status_code} is not a valid status"
        raise HailoStatusInvalidValueException(msg)
    return STATUS[status_code]


class ExceptionWrapper:
    """The real translation from a libhailort status to a Python exception."""

    @staticmethod
    def create_exception_from_status(error_code: int) -> HailoRTException:
        name = get_status_message(error_code)
        if name in _BY_NAME:
            cls, text = _BY_NAME[name]
            return cls(text)
        return HailoRTException(f"libhailort failed with error: {error_code} ({name})")


def status_error(
    code: int, detail: str, cls: type[HailoRTException] | None = None
) -> HailoRTException:
    """The exception the real binding raises for `code`; `detail` goes to the hailort log."""
    log.error("%s [%s]", detail, STATUS[code])
    error = ExceptionWrapper.create_exception_from_status(code)
    return cls(*error.args) if cls is not None else error


class HailoSchedulingAlgorithm(IntEnum):
    """`_pyhailort.SchedulingAlgorithm`."""

    NONE = 0
    ROUND_ROBIN = 1


class HailoStreamInterface(IntEnum):
    PCIe = 0
    INTEGRATED = 1
    ETH = 2
    MIPI = 3


class HailoStreamDirection(IntEnum):
    H2D = 0
    D2H = 1


class FormatType(IntEnum):
    """`hailo_format_type_t`: what the user buffers hold."""

    AUTO = 0
    UINT8 = 1
    UINT16 = 2
    FLOAT32 = 3


class FormatOrder(IntEnum):
    """`hailo_format_order_t` (the orders the stand-in's HEFs use, and a few neighbours)."""

    AUTO = 0
    NHWC = 1
    NHCW = 2
    FCR = 3
    F8CR = 4
    NHW = 5
    NC = 6
    BAYER_RGB = 7
    HAILO_NMS = 9
    RGB888 = 10
    NCHW = 11
    HAILO_NMS_WITH_BYTE_MASK = 20
    HAILO_NMS_BY_CLASS = 22
    HAILO_NMS_BY_SCORE = 23


class FormatFlags(IntEnum):
    NONE = 0


class DeviceArchitectureTypes(IntEnum):
    """What `identify().device_architecture` holds (hailo-notes.md section 3)."""

    HAILO8_A0 = 0
    HAILO8 = 1
    HAILO8L = 2
    HAILO15H = 3
    HAILO15L = 4
    HAILO15M = 5
    HAILO10H = 6


class PowerMode(IntEnum):
    """`hailo_power_mode_t` (for `InferModel.set_power_mode`)."""

    PERFORMANCE = 0
    ULTRA_PERFORMANCE = 1


@dataclass
class Format:
    """`hailo_format_t`: `.type`, `.order`, `.flags`."""

    type: FormatType
    order: FormatOrder
    flags: FormatFlags = FormatFlags.NONE


@dataclass(frozen=True)
class QuantInfo:
    """`hailo_quant_info_t`: float = (q - qp_zp) * qp_scale."""

    qp_zp: float
    qp_scale: float
    limvals_min: float
    limvals_max: float

    @classmethod
    def uint8(cls, zp: float, scale: float) -> QuantInfo:
        return cls(float(zp), float(scale), (0.0 - zp) * scale, (255.0 - zp) * scale)


for _cls in list(globals().values()):
    if isinstance(_cls, type) and _cls.__module__ == __name__:
        _cls.__module__ = MODULE
