"""`imu-node doctor`: what a Pi owner runs when something is off.

Each check prints one line: ok, warn, fail or skip, what it found, and for anything not ok what to
do. The usual culprit after an OS update is a HailoRT library that no longer matches the kernel
driver; the doctor compares them first.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from common.bundle import Bundle, read_bundle
from common.errors import EdgeError
from node.config import NodeConfig, default_spool_dir
from node.identity import default_node_id, hardware_identity
from node.mqtt.spool import spooled_bytes
from runtime.hailo_backend import ACCEPTS, import_hailo
from runtime.pipeline import load_model

DRIVER_VERSION_FILE = Path("/sys/module/hailo_pci/version")
DEVICE_NODE = Path("/dev/hailo0")
HOT_C = 85.0
"""Chip temperature that deserves a warning (Hailo-8 throttles near its junction limit)."""


class Level(StrEnum):
    """Outcome of one check."""

    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report."""

    name: str
    level: Level
    found: str
    fix: str = ""
    detail: str = ""
    """Output worth showing in full (e.g. what hailortcli printed), under the line."""


@dataclass(slots=True)
class _Context:
    config: NodeConfig
    hailo: Any = None
    device_arch: str | None = None
    bundle: Bundle | None = None


def run_checks(config: NodeConfig) -> list[Check]:
    """Every check, in the order a person would debug."""
    context = _Context(config)
    return [check for step in _STEPS for check in step(context)]


def format_report(checks: list[Check]) -> str:
    """Aligned lines, with the fix under anything not ok."""
    lines = []
    for check in checks:
        lines.append(f"[{check.level.value:^4}] {check.name:<22} {check.found}")
        if check.fix and check.level in (Level.WARN, Level.FAIL):
            lines.append(f"{'':7}{'':22} -> {check.fix}")
        lines.extend(f"{'':7}{'':22} | {line}" for line in check.detail.splitlines())
    failed = sum(c.level is Level.FAIL for c in checks)
    warned = sum(c.level is Level.WARN for c in checks)
    lines.append(f"\n{failed} failed, {warned} warnings, {len(checks)} checks")
    return "\n".join(lines)


def _software(ctx: _Context) -> Iterator[Check]:
    versions = []
    for package in ("imu-edge", "onnxruntime", "paho-mqtt", "numpy"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} ?")
    yield Check("software", Level.OK, ", ".join(versions))
    try:
        source = hardware_identity()
        level = Level.WARN if source.kind == "machine-id" else Level.OK
        node_id = ctx.config.node_id or "(derived)"
        yield Check(
            "node id",
            level,
            f"{node_id}, hardware identity from {source.kind}",
            "cloned SD cards share /etc/machine-id: set node_id in the config",
        )
    except RuntimeError as exc:
        yield Check("node id", Level.FAIL, str(exc), "set node_id in the config")


def _hailort(ctx: _Context) -> Iterator[Check]:
    wants_hailo = ctx.config.backend == "hailo"
    try:
        ctx.hailo = import_hailo()
    except EdgeError as exc:
        level = Level.FAIL if wants_hailo else Level.SKIP
        reason = str(exc.__cause__ or exc)
        yield Check(
            "HailoRT library",
            level,
            f"hailo_platform not importable: {reason}",
            "sudo apt install hailo-all; venv with --system-site-packages",
        )
        return
    library = str(getattr(ctx.hailo, "__version__", "?"))
    yield Check("HailoRT library", Level.OK, f"hailo_platform {library}")
    driver = _read(DRIVER_VERSION_FILE)
    if not driver:
        yield Check(
            "HailoRT driver",
            Level.WARN,
            f"no {DRIVER_VERSION_FILE} (driver not loaded?)",
            "sudo modprobe hailo_pci; check `dmesg | grep -i hailo`",
        )
    elif driver.split(".")[:2] != library.split(".")[:2]:
        yield Check(
            "HailoRT driver",
            Level.FAIL,
            f"driver {driver} vs library {library}",
            "library and driver must match: sudo apt install --reinstall hailo-all "
            "(or the pinned pair), then reboot",
        )
    else:
        yield Check("HailoRT driver", Level.OK, f"hailo_pci {driver} matches the library")
    if DEVICE_NODE.exists() and not os.access(DEVICE_NODE, os.R_OK | os.W_OK):
        yield Check(
            "device node",
            Level.FAIL,
            f"{DEVICE_NODE} is not read/writable by this user",
            "add a udev rule or group for /dev/hailo* (docs/hardware.md)",
        )


def _device(ctx: _Context) -> Iterator[Check]:
    if ctx.hailo is None:
        return
    try:
        found = [str(d) for d in ctx.hailo.Device.scan()]
    except Exception as exc:
        found, error = [], str(exc)
    else:
        error = ""
    if not found:
        yield Check(
            "Hailo devices",
            Level.FAIL,
            f"none found {error}".strip(),
            "check the HAT, `lspci | grep Hailo`, `dmesg | grep -i hailo`",
        )
        return
    yield Check("Hailo devices", Level.OK, ", ".join(found))
    try:
        with ctx.hailo.Device(found[0]) as device:
            board = device.control.identify()
            arch = str(getattr(board.device_architecture, "name", board.device_architecture))
            ctx.device_arch = arch.upper()
            yield Check(
                "architecture",
                Level.OK,
                f"{ctx.device_arch}, firmware {board.firmware_version}, "
                f"serial {str(board.serial_number).strip() or 'n/a'}",
            )
            temp = float(device.control.get_chip_temperature().ts0_temperature)
            level = Level.WARN if temp >= HOT_C else Level.OK
            yield Check(
                "chip temperature",
                level,
                f"{temp:.1f} C",
                "improve cooling (heatsink, fan, airflow)",
            )
    except Exception as exc:
        yield Check(
            "device control",
            Level.FAIL,
            str(exc),
            "another process may hold the device: `sudo lsof /dev/hailo0`",
        )


HAILORTCLI_TIMEOUT_S = 15.0


def _hailortcli(ctx: _Context) -> Iterator[Check]:
    """What Hailo's own tool says about the device, shown as it printed it."""
    tool = shutil.which("hailortcli")
    if tool is None:
        level = Level.WARN if ctx.config.backend == "hailo" else Level.SKIP
        yield Check(
            "hailortcli",
            level,
            "not installed (comes with hailo-all)",
            "sudo apt install hailo-all",
        )
        return
    for args, fix in (
        (["scan"], "no device on the bus: check the HAT, `lspci | grep Hailo`, `dmesg`"),
        (["fw-control", "identify"], "the firmware does not answer: reboot; check `dmesg`"),
    ):
        name = f"hailortcli {' '.join(args)}"
        try:
            done = subprocess.run(
                [tool, *args],
                capture_output=True,
                text=True,
                timeout=HAILORTCLI_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            yield Check(name, Level.FAIL, f"did not finish: {exc}", fix)
            continue
        output = (done.stdout + done.stderr).strip()
        empty = "not found" in output.lower()
        if done.returncode != 0 or empty:
            yield Check(name, Level.FAIL, f"exit status {done.returncode}", fix, output)
        else:
            yield Check(name, Level.OK, f"exit status {done.returncode}", "", output)


def _broker(ctx: _Context) -> Iterator[Check]:
    address = ctx.config.broker_address
    version = (
        MQTTProtocolVersion.MQTTv5
        if ctx.config.mqtt_protocol == "5"
        else (MQTTProtocolVersion.MQTTv311)
    )
    client = mqtt.Client(CallbackAPIVersion.VERSION2, "imu-node-doctor", protocol=version)
    if ctx.config.username:
        password = ctx.config.password.get_secret_value() if ctx.config.password else None
        client.username_pw_set(ctx.config.username, password)
    if address.tls:
        client.tls_set(ca_certs=str(ctx.config.ca_file) if ctx.config.ca_file else None)
    answered = threading.Event()
    outcome: list[str] = []

    def on_connect(client: mqtt.Client, userdata: Any, flags: Any, code: Any, props: Any) -> None:
        outcome.append(str(code))
        answered.set()

    client.on_connect = on_connect
    try:
        client.connect(str(address.host), address.port, keepalive=10)
        client.loop_start()
        answered.wait(5)
    except OSError as exc:
        yield Check(
            "broker",
            Level.FAIL,
            f"{address}: {exc}",
            "is the broker running and reachable? check host, port, firewall",
        )
        return
    finally:
        client.disconnect()
        client.loop_stop()
    if not outcome:
        yield Check(
            "broker",
            Level.FAIL,
            f"{address}: no answer in 5 s",
            "wrong port or a TLS/plain mismatch (mqtt:// vs mqtts://)",
        )
    elif outcome[0] != "Success":
        yield Check(
            "broker",
            Level.FAIL,
            f"{address} refused: {outcome[0]}",
            "check username/password (IMU_NODE_PASSWORD) and the broker's ACL",
        )
    else:
        yield Check("broker", Level.OK, f"{address} accepted MQTT {ctx.config.mqtt_protocol}")


def _bundle(ctx: _Context) -> Iterator[Check]:
    if ctx.config.model is None:
        yield Check("model bundle", Level.SKIP, "no --model given")
        return
    try:
        ctx.bundle = read_bundle(ctx.config.model)
    except EdgeError as exc:
        yield Check("model bundle", Level.FAIL, str(exc), "rebuild or re-download the bundle")
        return
    manifest = ctx.bundle.manifest
    files = ", ".join(sorted(manifest.files))
    yield Check(
        "model bundle", Level.OK, f"{manifest.name} {manifest.version} ({files}), hashes ok"
    )
    if manifest.signature is None:
        yield Check(
            "signature",
            Level.WARN,
            "unsigned",
            "sign bundles with the fleet key before rolling them out",
        )
    else:
        yield Check("signature", Level.OK, f"ed25519 key {manifest.signature.key_id}")
    if manifest.hef is not None and ctx.device_arch is not None:
        fits = manifest.hef.hw_arch in ACCEPTS.get(ctx.device_arch, set())
        yield Check(
            "HEF fits device",
            Level.OK if fits else Level.FAIL,
            f"HEF for {manifest.hef.hw_arch} on {ctx.device_arch}",
            f"compile for this chip: --hw-arch {ctx.device_arch.lower()}",
        )


def _golden(ctx: _Context) -> Iterator[Check]:
    if ctx.bundle is None:
        return
    backends = ["onnx"] if ctx.bundle.onnx is not None else []
    if ctx.bundle.hef is not None and ctx.device_arch is not None:
        backends.append("hailo")
    for backend in backends:
        try:
            pipeline = load_model(ctx.bundle, backend, ctx.config.backend_options())
        except EdgeError as exc:
            yield Check(
                f"golden check ({backend})",
                Level.FAIL,
                str(exc),
                "it does not reproduce its goldens: recompile or rebuild",
            )
            continue
        report = pipeline.golden_check()
        pipeline.close()
        yield Check(
            f"golden check ({backend})",
            Level.OK,
            f"{report.count} windows, min cosine {report.min_cosine:.5f}, "
            f"max abs error {report.max_abs_error:.2g}",
        )


def _spool(ctx: _Context) -> Iterator[Check]:
    config = ctx.config
    if config.spool_max_mb == 0:
        yield Check("result spool", Level.SKIP, "off (spool_max_mb = 0)")
        return
    try:
        folder = config.spool_dir or default_spool_dir(config.node_id or default_node_id())
    except RuntimeError as exc:
        yield Check("result spool", Level.FAIL, str(exc), "set node_id or spool_dir")
        return
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("/"))
    if not os.access(existing, os.W_OK):
        yield Check(
            "result spool",
            Level.FAIL,
            f"{existing} is not writable by this user",
            f"create {folder} for the node's user, or set spool_dir",
        )
        return
    waiting = spooled_bytes(folder)
    free_mb = shutil.disk_usage(existing).free / 2**20
    found = f"{folder}, {waiting / 2**20:.1f} MB waiting, {free_mb:,.0f} MB free"
    if free_mb < config.spool_max_mb:
        yield Check(
            "result spool",
            Level.WARN,
            found,
            f"spool_max_mb is {config.spool_max_mb}: free disk or lower it",
        )
        return
    yield Check("result spool", Level.OK, found)


_STEPS: tuple[Callable[[_Context], Iterator[Check]], ...] = (
    _software,
    _hailort,
    _device,
    _hailortcli,
    _broker,
    _spool,
    _bundle,
    _golden,
)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
