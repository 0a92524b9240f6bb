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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import psutil

from common.bundle import Bundle, read_bundle
from common.errors import EdgeError
from common.mqtt.session import MqttSession
from node.config import NodeConfig, default_spool_dir
from node.identity import default_node_id, hardware_identity
from node.mqtt.spool import spooled_bytes
from node.presence import NODE_SESSION_EXPIRY_S, client_id_for
from runtime.hailo_backend import ACCEPTS, import_hailo
from runtime.pipeline import load_model

DRIVER_VERSION_FILE = Path("/sys/module/hailo_pci/version")
DEVICE_NODE = Path("/dev/hailo0")
HOT_C = 85.0
"""Chip temperature that deserves a warning (Hailo-8 throttles near its junction limit)."""


BROKER_TIMEOUT_S = 8.0
"""How long the broker check waits for a login (three refusals in a row end it sooner)."""


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
    """Log in exactly as the node does (the same settings, certificate and password file, the
    same session code), unless the node runs: a broker that ties sessions to logins would
    hand the node's session to the doctor, so then the node's own /readyz answers instead."""
    config = ctx.config
    address = config.broker_address
    running = _running_node(config)
    if running is not None:
        connected, detail = running
        level = Level.OK if connected else Level.FAIL
        fix = "" if connected else "see the node's log for the refusal and its fix"
        yield Check("broker", level, f"{address}: the running node says {detail}", fix)
        return
    process = _node_process(config.node_id or default_node_id())
    if process is not None:
        yield Check(
            "broker",
            Level.SKIP,
            f"{address}: a node runs here ({process}): not logging in as it",
            "a broker that ties sessions to logins would hand it the node's session; the node's "
            "log names any refusal with its fix (or give the node http_listen: doctor asks it)",
        )
        return
    try:  # the node's own login, resuming (never wiping) the session the broker keeps for it,
        # acknowledging nothing: windows queued for the node stay queued for the node
        settings = config.connection().session_settings(
            client_id=client_id_for(config.node_id or default_node_id()),
            keepalive_s=10,
            manual_ack=True,
            session_expiry_s=NODE_SESSION_EXPIRY_S,
        )
        session = MqttSession(settings)
    except (ValueError, EdgeError) as exc:
        yield Check("broker", Level.FAIL, f"{address}: {exc}", "fix the connection settings")
        return
    try:
        session.connect(BROKER_TIMEOUT_S)
    except ConnectionError:
        refusal = session.refusal
        reason = refusal.reason if refusal else session.connect_error()
        fix = refusal.fix if refusal else "is the broker running and reachable?"
        yield Check("broker", Level.FAIL, reason, fix)
        return
    session.stop()
    how = "certificate" if config.cert_file else "password" if config.username else "anonymous"
    yield Check("broker", Level.OK, f"{address} accepted MQTT {config.mqtt_protocol} ({how} login)")


def _node_process(node_id: str) -> str | None:
    """`pid N: COMMAND` of an `imu-node run` process on this machine that is (or may be) the
    node `node_id`: one started for another node id (its --node-id, or its --config file's
    node_id) does not count."""
    me = os.getpid()
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        words = process.info["cmdline"] or []
        runs_node = "run" in words and any(w.endswith(("imu-node", "node.cli")) for w in words[:3])
        if not runs_node or process.info["pid"] == me:
            continue
        if _node_id_of(words, process.info["cwd"]) in (None, node_id):
            return f"pid {process.info['pid']}: {' '.join(words)[:80]}"
    return None


def _node_id_of(words: list[str], cwd: str | None) -> str | None:
    """The node id a node's command line names (--node-id, or node_id in its --config), if
    it can be read."""
    import tomllib  # noqa: PLC0415

    def value(flag: str) -> str | None:
        for i, word in enumerate(words):
            if word == flag and i + 1 < len(words):
                return words[i + 1]
            if word.startswith(f"{flag}="):
                return word.partition("=")[2]
        return None

    named = value("--node-id")
    if named is not None:
        return named
    config = value("--config")
    if config is None:
        return None
    try:
        found = tomllib.loads((Path(cwd or "/") / config).read_text()).get("node_id")
    except (OSError, ValueError):
        return None
    return found if isinstance(found, str) else None


def _running_node(config: NodeConfig) -> tuple[bool, str] | None:
    """(broker connected, what it says) from the node's own /readyz, when it answers."""
    if not config.http_listen:
        return None
    import json  # noqa: PLC0415
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    from common.http import parse_listen  # noqa: PLC0415

    host, port = parse_listen(config.http_listen)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104 (a bind address)
    scheme = "https" if config.http_tls_cert else "http"
    try:
        with urllib.request.urlopen(  # noqa: S310 (our own node's address)
            f"{scheme}://{host}:{port}/readyz", timeout=3
        ) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:  # 503: not ready, with its checks
        body = json.loads(exc.read() or b"{}")
    except (OSError, ValueError):
        return None
    connected = bool(body.get("checks", {}).get("broker_connected"))
    return connected, "connected" if connected else "not connected"


def _bundle(ctx: _Context) -> Iterator[Check]:
    if ctx.config.model is None:
        yield Check(
            "model bundle",
            Level.SKIP,
            "none configured: the node serves the one it served last, or waits for the "
            "fleet's first order",
        )
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
