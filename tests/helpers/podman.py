"""Podman and podman-compose for tests/image: commands, health checks, the site the stacks
run with (made the documented way: `imu-fleet pki`, `imu-fleet keys generate`, a signed bundle,
files owned and moded as the compose headers say)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleet.pki.site import add_client, init_site

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
NODE_ID = "pi-0042"
DASHBOARD = "ops"
CHECK = "ci"
EDGE_PROJECT = "imu-edge"
FLEET_PROJECT = "imu-fleet"
EDGE = ["--project-name", EDGE_PROJECT, "-f", "edge.yml"]
FLEET = ["--project-name", FLEET_PROJECT, "-f", "fleet.yml"]
"""podman-compose's first arguments for each stack (run from compose/)."""
NODE_UID = 10001
BROKER_UID = 1883
HTTP_TOKEN = "http-token-for-the-image-test"
DASHBOARD_TOKEN = "dashboard-token-for-the-image-test"
UP_TIMEOUT_S = 180.0


def podman(
    *args: str, check: bool = True, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run `podman ARGS`; on failure (with `check`) the test fails with podman's own words."""
    done = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        pytest.fail(f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return done


def inspect(name: str) -> dict[str, Any]:
    """`podman inspect NAME` (a container or an image)."""
    found: list[dict[str, Any]] = json.loads(podman("inspect", name).stdout)
    return found[0]


def image_healthcheck(image: str) -> list[str]:
    """The HEALTHCHECK test of an image (`["CMD", ...]`), or [] without one. Podman reports it
    beside Config, Docker inside it."""
    found = inspect(image)
    check = found.get("Healthcheck") or found["Config"].get("Healthcheck") or {}
    return list(check.get("Test") or [])


def logs(container: str, tail: int | None = None) -> str:
    """What the container wrote (stdout and stderr), all or the last `tail` lines."""
    done = podman("logs", *(["--tail", str(tail)] if tail else []), container, check=False)
    return done.stdout + done.stderr


def wait_healthy(container: str, timeout: float = UP_TIMEOUT_S) -> None:
    """Run the container's health check until it passes. Podman only schedules health checks
    through systemd timers, which a CI container lacks, so the test runs them itself."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        done = podman("healthcheck", "run", container, check=False)
        if done.returncode == 0:
            return
        state = inspect(container)["State"]
        if not state.get("Running"):
            exit_code = state.get("ExitCode")
            pytest.fail(f"{container} stopped (exit {exit_code}):\n{logs(container, 40)}")
        last = (done.stdout + done.stderr).strip()
        time.sleep(2)
    pytest.fail(f"{container} not healthy after {timeout:.0f} s ({last}):\n{logs(container, 40)}")


@dataclass(frozen=True)
class Site:
    """What the stacks were started with: folders, files and the environment compose read."""

    root: Path
    site: Path
    node_dir: Path
    secrets: Path
    env: dict[str, str]

    def client(self, role: str, name: str, suffix: str) -> Path:
        return self.site / "clients" / f"{role}-{name}.{suffix}"

    @property
    def ca(self) -> Path:
        return self.site / "clients" / "ca.crt"


def _own(path: Path, uid: int, mode: int) -> None:
    os.chown(path, uid, uid)
    path.chmod(mode)


def make_site(root: Path) -> Site:
    """The folders of compose/edge.yml's and compose/fleet.yml's headers, made as they say."""
    site = root / "site"
    hosts = ["mosquitto", "host.containers.internal", "localhost", "127.0.0.1"]
    init_site(site, site="image-test", hosts=hosts, broker_owner=f"{BROKER_UID}:{BROKER_UID}")
    add_client(site, "node", NODE_ID, use_tool=False)
    add_client(site, "dashboard", DASHBOARD, use_tool=False)
    add_client(site, "check", CHECK, use_tool=False)
    clients = site / "clients"

    node_dir = root / "etc-imu-node"
    (node_dir / "models").mkdir(parents=True)
    (node_dir / "fleet-keys").mkdir()
    for name in ["ca.crt", f"node-{NODE_ID}.crt", f"node-{NODE_ID}.key"]:
        shutil.copy(clients / name, node_dir / name)
    _own(node_dir / f"node-{NODE_ID}.key", NODE_UID, 0o400)
    for name, token in [("http-token", HTTP_TOKEN), ("metrics-token", "scrape-token")]:
        (node_dir / name).write_text(token + "\n")
        _own(node_dir / name, NODE_UID, 0o400)
    bundle = node_dir / "models" / "tcn-reference-1.0.0.tar"
    fleet = shutil.which("imu-fleet") or pytest.fail("imu-fleet is not on PATH")
    for command in (
        ["keys", "generate", "--out", str(root / "keys")],
        ["bundle", "reference", "--out", str(bundle), "--version", "1.0.0"],
        ["bundle", "sign", str(bundle), "--key", str(root / "keys" / "fleet.key")],
    ):
        subprocess.run([fleet, *command], check=True, capture_output=True, timeout=120)
    shutil.copy(root / "keys" / "fleet.pub", node_dir / "fleet-keys" / "fleet.pub")
    for path in [node_dir, node_dir / "models", node_dir / "fleet-keys", *node_dir.rglob("*")]:
        if path.is_dir() or path.suffix in {".crt", ".tar", ".pub"}:
            path.chmod(0o755 if path.is_dir() else 0o644)

    secrets = root / "etc-imu-fleet"
    secrets.mkdir(mode=0o700)
    shutil.copy(clients / f"dashboard-{DASHBOARD}.password", secrets / "dashboard-password")
    for name, value in [("dashboard-token", DASHBOARD_TOKEN), ("dashboard-metrics-token", "m"),
                        ("imu-node-token", "n"), ("grafana-admin-password", "g")]:  # fmt: skip
        (secrets / name).write_text(value + "\n")
    for secret in secrets.iterdir():
        secret.chmod(0o444)

    env = {
        "IMU_SITE_DIR": str(site),
        "IMU_SITE_SECRETS_DIR": str(secrets),
        "IMU_EDGE_NODE_DIR": str(node_dir),
        "IMU_EDGE_NODE_ID": NODE_ID,
        "IMU_EDGE_MODEL": bundle.name,
        "IMU_EDGE_BACKEND": "onnx",
        "IMU_SITE_DASHBOARD_NAME": DASHBOARD,
        # one broker per site: the dashboard reaches the edge stack's broker through the host
        "IMU_SITE_BROKER": "mqtts://host.containers.internal:8884",
    }
    return Site(root, site, node_dir, secrets, env)


def compose(
    site: Site, *args: str, check: bool = True, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """`podman-compose ARGS` from compose/ (podman-compose 1.6 resolves an `extends` file
    against the working folder as well as the compose file's: run from compose/ both agree);
    on failure (with `check`) the test fails with its own words."""
    done = subprocess.run(
        ["podman-compose", *args],
        cwd=COMPOSE,
        env={**os.environ, **site.env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        command = " ".join(args)
        pytest.fail(f"podman-compose {command}: exit {done.returncode}\n{done.stderr[-3000:]}")
    return done
