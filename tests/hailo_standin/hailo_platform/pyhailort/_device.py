"""`VDevice`, `Device` and its control of the stand-in: a PCIe Hailo chip at 0000:01:00.0.

Mirrors HailoRT 4.23 (hailo-notes.md sections 1 and 3):
- `VDevice.create_params()` defaults to scheduling NONE (the 4.x Python default), device_count
  1, group_id "UNIQUE", multi_process_service False; `VDevice()` runs `gc.collect()` first so
  stale owners release the chip, and `__exit__`/`__del__` release it;
- a VDevice marks its chip as used: a second one in this process with another group (every
  "UNIQUE" is its own group; the same non-UNIQUE group shares the chip), or any while the
  `busy` fault says another process holds the chip, fails with HAILO_OUT_OF_PHYSICAL_DEVICES
  (74) as a plain HailoRTException (`faults.devices` > 1 puts more chips in the machine);
- no device: `Device()` raises `HailoRTException('HailoRT device not found in the system')`,
  `VDevice()` fails like a busy chip, with 74 (its device count check; vdevice.cpp), and
  `Device(unknown_id)` leaks a raw `_pyhailort.HailoRTStatusException` (not wrapped in 4.23);
- `create_infer_model` takes a str path or bytes only and must run in the creating process;
- a bare `Device` (control: identify, temperature) does not mark the chip as used.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from hailo_platform.pyhailort._common import (
    MODULE,
    DeviceArchitectureTypes,
    HailoRTException,
    HailoSchedulingAlgorithm,
    HefSourceTypeError,
    UseAfterRelease,
    log,
    status_error,
)
from hailo_platform.pyhailort._engine import DeviceContext
from hailo_platform.pyhailort._hef import load_hef_bytes, parse_hef_bytes
from hailo_platform.pyhailort._infer_model import InferModel
from hailo_platform.pyhailort._pyhailort import raw_status
from hailo_standin import faults

DEVICE_ID = "0000:01:00.0"
"""The PCIe BDF of the stand-in's first chip (`faults.devices` adds 0000:02:00.0, ...)."""
HAILO_UNIQUE_VDEVICE_GROUP_ID = "UNIQUE"
BOARD_INFO_NOT_CONFIGURED_ATTR = "<N/A>"
FIRMWARE_VERSION = "4.23.0"
NOT_FOUND_TEXT = "HailoRT device not found in the system"

_registry_lock = threading.Lock()
_holders: dict[int, tuple[str, list[str]]] = {}
"""Live VDevices of this process: token -> (group_id, the device ids it holds)."""
_tokens = itertools.count(1)


def _scan() -> list[str]:
    state = faults.current()
    return [] if state.no_device else [f"0000:{i:02x}:00.0" for i in range(1, state.devices + 1)]


@dataclass(frozen=True)
class BoardInformation:
    """What `control.identify()` returns."""

    protocol_version: int
    firmware_version: str
    logger_version: int
    board_name: str
    device_architecture: DeviceArchitectureTypes
    serial_number: str
    part_number: str
    product_name: str

    def __str__(self) -> str:
        """As `hailortcli fw-control identify` prints it."""
        return "\n".join(
            [
                f"Control Protocol Version: {self.protocol_version}",
                f"Firmware Version: {self.firmware_version} (release,app,extended context switch "
                "buffer)",
                f"Logger Version: {self.logger_version}",
                f"Board Name: {self.board_name}",
                f"Device Architecture: {self.device_architecture.name}",
                f"Serial Number: {self.serial_number}",
                f"Part Number: {self.part_number}",
                f"Product Name: {self.product_name}",
            ]
        )


@dataclass(frozen=True)
class TemperatureInfo:
    """What `control.get_chip_temperature()` returns (degrees Celsius)."""

    ts0_temperature: float
    ts1_temperature: float
    sample_count: int


class Control:
    """`device.control`: firmware control requests to one chip."""

    def __init__(self, device: Device) -> None:
        self._device = device
        self._samples = 0

    def identify(self) -> BoardInformation:
        self._device._check()
        arch = faults.current().arch
        return BoardInformation(
            protocol_version=2,
            firmware_version=FIRMWARE_VERSION,
            logger_version=0,
            board_name="Hailo-8L" if arch == "hailo8l" else "Hailo-8",
            device_architecture=DeviceArchitectureTypes[arch.upper()],
            serial_number="HLSTANDIN0000001",
            part_number=BOARD_INFO_NOT_CONFIGURED_ATTR,
            product_name=BOARD_INFO_NOT_CONFIGURED_ATTR,
        )

    def get_chip_temperature(self) -> TemperatureInfo:
        self._device._check()
        celsius = float(faults.current().temperature_c)
        self._samples += 1
        return TemperatureInfo(celsius, celsius, self._samples)


class Device:
    """One physical Hailo device, for control (identify, temperature)."""

    def __init__(self, device_id: str | None = None) -> None:
        self._released = True
        found = _scan()
        if not found:
            raise HailoRTException(NOT_FOUND_TEXT)
        if device_id is None:
            device_id = found[0]
        if device_id not in found:  # `_pyhailort.Device.create` is not wrapped: it leaks raw
            log.error("device %r not found; scanned %s [HAILO_NOT_FOUND]", device_id, found)
            raise raw_status(61)
        self._device_id = device_id
        self._released = False
        self.control = Control(self)

    @staticmethod
    def scan() -> list[str]:
        """Ids (PCIe BDF) of the devices present."""
        return _scan()

    @property
    def device_id(self) -> str:
        return self._device_id

    def _check(self) -> None:
        if self._released:
            msg = "this Device was released"
            raise UseAfterRelease(msg)

    def release(self) -> None:
        self._released = True

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *args: object) -> None:
        self.release()


class VDeviceParams:
    """`_pyhailort.VDeviceParams`."""

    def __init__(self) -> None:
        self.device_count = 1
        self.device_ids: list[str] = []
        self.scheduling_algorithm = HailoSchedulingAlgorithm.NONE
        self.group_id = HAILO_UNIQUE_VDEVICE_GROUP_ID
        self.multi_process_service = False

    @staticmethod
    def default() -> VDeviceParams:
        return VDeviceParams()


@dataclass
class _Owner:
    token: int
    context: DeviceContext
    device_ids: list[str] = field(default_factory=list)


class VDevice:
    """Hailo virtual device: owns the chip while alive."""

    def __init__(self, params: VDeviceParams | None = None, *, device_ids: Any = None) -> None:
        gc.collect()
        self._owner: _Owner | None = None
        self._creation_pid = os.getpid()
        self._params = params if params is not None else VDevice.create_params()
        self._open(list(device_ids) if device_ids is not None else list(self._params.device_ids))

    def _open(self, wanted: list[str]) -> None:
        params = self._params
        if params.multi_process_service:
            msg = (
                "hailo_platform stand-in: multi_process_service (hailort_service) is not "
                "implemented; share the chip between threads of one process instead"
            )
            raise NotImplementedError(msg)
        found = _scan()
        if not found:  # real 4.23 gets here through its device count check (vdevice.cpp)
            raise status_error(
                74,
                "Failed to create vdevice. there are not enough free devices. "
                "requested: 1, found: 0",
            )
        for device_id in wanted:
            if device_id not in found:
                raise status_error(2, f"device {device_id!r} not found; scanned {found}")
        count = len(wanted) or int(params.device_count)
        with _registry_lock:
            ids = self._claim(found, wanted, count, str(params.group_id))
            token = next(_tokens)
            _holders[token] = (str(params.group_id), ids)
        context = DeviceContext(HailoSchedulingAlgorithm(params.scheduling_algorithm), os.getpid())
        self._owner = _Owner(token, context, ids)

    @staticmethod
    def _claim(found: list[str], wanted: list[str], count: int, group: str) -> list[str]:
        """Devices for a new VDevice: free ones, or its (non-UNIQUE) group's; else error 74."""
        shared = group != HAILO_UNIQUE_VDEVICE_GROUP_ID
        for held_group, ids in _holders.values():
            if shared and held_group == group and (not wanted or wanted == ids):
                return list(ids)  # the same group shares its devices
        taken = {d for held_group, ids in _holders.values() for d in ids}
        free = [] if faults.current().busy else [d for d in found if d not in taken]
        chosen = [d for d in wanted if d in free] if wanted else free[:count]
        if len(chosen) < count:
            raise status_error(
                74,
                "Failed to create vdevice. there are not enough free devices. "
                f"requested: {count}, found: {len(free)}",
            )
        return chosen

    @staticmethod
    def create_params() -> VDeviceParams:
        """Defaults: scheduling NONE (4.x), device_count 1, group "UNIQUE", no service."""
        return VDeviceParams.default()

    def __enter__(self) -> VDevice:
        return self

    def __exit__(self, *args: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown
            self.release()

    def release(self) -> None:
        """Release the chip: configured models on it are shut down."""
        owner, self._owner = getattr(self, "_owner", None), None
        if owner is None:
            return
        owner.context.released = True
        for pipeline in list(owner.context.pipelines):
            pipeline.shutdown()
        with _registry_lock:
            _holders.pop(owner.token, None)
            held = any(set(ids) & set(owner.device_ids) for _, ids in _holders.values())
        if not held:  # the chip's last owner left: the driver resets it
            faults.chip_event("reset")

    def _live(self) -> _Owner:
        if self._owner is None:
            msg = "'NoneType' object: this VDevice was released"
            raise UseAfterRelease(msg)
        return self._owner

    def get_physical_devices(self) -> list[Device]:
        return [Device(device_id) for device_id in self.get_physical_devices_ids()]

    def get_physical_devices_ids(self) -> list[str]:
        return list(self._live().device_ids)

    def create_infer_model(self, hef_source: str | bytes, name: str = "") -> InferModel:
        """An InferModel from a str path or bytes (pathlib.Path: ValueError, as HEF())."""
        if os.getpid() != self._creation_pid:
            msg = "InferModel can be created only from the process VDevice was created in."
            raise HailoRTException(msg)
        owner = self._live()
        if not isinstance(hef_source, str | bytes):
            msg = "HEF can only be created from a file path (str) or a buffer (bytes)"
            raise HefSourceTypeError(msg)
        data, _ = load_hef_bytes(hef_source)
        hef = parse_hef_bytes(data)
        if name and name != hef.network_group:
            raise status_error(7, "Passing network name is not supported yet!")
        return InferModel(hef_source, hef, owner.context)

    def configure(self, hef: Any, configure_params_by_name: Any = None) -> Any:
        """The old vstream API: not implemented by the stand-in."""
        msg = (
            "hailo_platform stand-in: VDevice.configure (the old vstream API) is not "
            "implemented; use create_infer_model"
        )
        raise NotImplementedError(msg)


for _cls in (BoardInformation, TemperatureInfo, Control, Device, VDeviceParams, VDevice):
    _cls.__module__ = MODULE
