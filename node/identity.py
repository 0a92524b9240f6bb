"""A node id that is stable on one machine and unique across machines.

Cloned SD cards copy `/etc/machine-id` and any file we could persist, so the id is derived from
the hardware on every start: the board's serial number (Raspberry Pi device tree or cpuinfo), else
the first wired/wireless interface's burned-in MAC address. `/etc/machine-id` is only the last
resort, with a warning. Set `node_id` in the config to choose an id yourself.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_SERIAL_FILES = (
    Path("/sys/firmware/devicetree/base/serial-number"),
    Path("/proc/device-tree/serial-number"),
)
_NET = Path("/sys/class/net")
_VIRTUAL_PREFIXES = ("lo", "docker", "veth", "br-", "virbr", "tun", "tap", "wg", "vmnet", "bond")


@dataclass(frozen=True, slots=True)
class IdentitySource:
    """Where the node id came from (for `imu-node id` and the birth message)."""

    kind: str
    value: str


def hardware_identity(root: Path = Path("/")) -> IdentitySource:
    """The most specific hardware identity available under `root`."""
    for path in _SERIAL_FILES:
        serial = _read(root / path.relative_to("/")).strip("\x00 \n")
        if serial and set(serial) != {"0"}:
            return IdentitySource("board-serial", serial)
    cpuinfo = _read(root / "proc/cpuinfo")
    match = re.search(r"^Serial\s*:\s*([0-9a-fA-F]+)\s*$", cpuinfo, re.MULTILINE)
    if match and set(match.group(1)) != {"0"}:
        return IdentitySource("cpu-serial", match.group(1).lower())
    mac = _permanent_mac(root / _NET.relative_to("/"))
    if mac:
        return IdentitySource("mac", mac)
    machine_id = _read(root / "etc/machine-id").strip()
    if machine_id:
        logger.warning(
            "node id derived from /etc/machine-id, which cloned SD cards share; set node_id"
        )
        return IdentitySource("machine-id", machine_id)
    msg = "no hardware identity found (no serial, MAC or machine-id); set node_id in the config"
    raise RuntimeError(msg)


def default_node_id(root: Path = Path("/")) -> str:
    """`node-` plus 12 hex digits of a hash of the hardware identity."""
    source = hardware_identity(root)
    digest = hashlib.sha256(f"{source.kind}:{source.value}".encode()).hexdigest()
    return f"node-{digest[:12]}"


def _permanent_mac(net: Path) -> str | None:
    try:
        names = sorted(p.name for p in net.iterdir())
    except OSError:
        return None
    for name in names:
        if name.startswith(_VIRTUAL_PREFIXES) or not (net / name / "device").exists():
            continue  # virtual interfaces have no backing device
        mac = _read(net / name / "address").strip().lower()
        if mac and mac != "00:00:00:00:00:00" and not int(mac[:2], 16) & 0x02:
            return mac  # universally administered (burned-in) address
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
