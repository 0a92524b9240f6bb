"""The runbook is a test: "A site on one machine, without Docker" of docs/operations.md, as written.

The operator's report: every part passed its own tests, and the path through them broke at the
seams (doctor false-failing on a secured node, a rollback leaving the group on the bad version, a
node that could not start empty, a drop-in Debian's mosquitto refused). This test takes the
section's blocks in order and runs each command line in bash, as the operator would, on one
machine without Docker. Only what cannot be the same on a test machine is changed, and the same
way on every line (`localize`): `/etc`, `/var/lib`, `/run` and `/var/log` move under a temporary
root, the ports are free ones, `broker.local` is `localhost` (the certificates are made for the
name the lines use), and `sudo` is dropped (CI runs as root). `systemctl restart mosquitto` starts
Debian's own /etc/mosquitto/mosquitto.conf (localized) with the drop-in the runbook copied next to
it, as the package's unit does; `systemctl enable --now UNIT` starts the `ExecStart` line of the
unit file the runbook copied. A line ending in `&` runs in the background until the end.

Between the lines, the test checks what the operator would look at: the waiting node, the first
model, the rollout and the rollback, the node that joins afterwards, the unpinned fleet.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from helpers.processes import stop_process
from helpers.waiting import wait_until
from node.tools.local_broker import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs" / "operations.md"
DEBIAN_CONF = Path("/etc/mosquitto/mosquitto.conf")
PORTS = ("8883", "8884", "1883", "8090", "9109")
SECTION = re.compile(r"<!-- runbook-journey -->(.*?)<!-- /runbook-journey -->", flags=re.S)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runs the runbook's root steps (CI is root)"),
    pytest.mark.skipif(
        not DEBIAN_CONF.is_file() or shutil.which("mosquitto") is None,
        reason="needs Debian's mosquitto package (apt-get install -y mosquitto)",
    ),
]


@dataclass(frozen=True)
class Block:
    """One fenced block of the section: shell lines, or a TOML file named by its first line."""

    language: str
    text: str


def journey() -> list[Block]:
    """The section's blocks, in order."""
    (section,) = SECTION.findall(RUNBOOK.read_text())
    return [
        Block(language, textwrap.dedent(text))
        for language, text in re.findall(r"```(sh|toml)\n(.*?)```", section, flags=re.S)
    ]


@dataclass
class Site:
    """The temporary machine: its root, ports, programs in the background, and their logs."""

    root: Path
    ports: dict[str, int]
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    rollout_id: str | None = None

    @property
    def operator(self) -> Path:
        return self.root / "home" / "operator"

    def localize(self, text: str) -> str:
        """The runbook's line on this machine (the module docstring lists every change)."""
        for folder in ("/etc/", "/var/lib/", "/var/log/", "/run/"):
            text = re.sub(rf"(?<![\w.-]){folder}", f"{self.root}{folder}", text)
        text = text.replace("/opt/imu-edge/.venv/bin/", f"{Path(sys.executable).parent}/")
        text = text.replace("broker.local", "localhost")
        for standard, actual in self.ports.items():
            text = re.sub(rf"(?<=[: ]){standard}\b", str(actual), text)
        text = re.sub(r"(^|\| )sudo ", r"\1", text)
        if self.rollout_id is not None:
            text = text.replace("ROLLOUT-ID", self.rollout_id)
        return text

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMU_", "PYTEST"))}
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        env["XDG_STATE_HOME"] = str(self.root / "home" / "state")
        env["XDG_CACHE_HOME"] = str(self.root / "home" / "cache")
        env["PYTHONPATH"] = str(ROOT)
        return env

    def run(self, line: str, timeout: float = 300) -> str:
        """Run one command line in bash in the operator's folder; it must exit 0."""
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", line], cwd=self.operator, env=self.env(),
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        output = done.stdout + done.stderr
        self.outputs.append(f"$ {line}\n{output}")
        assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{output}"
        assert "Traceback" not in output, output
        return output

    def start(self, line: str, name: str) -> None:
        """Run a long-lived command line in the background, its output in logs/NAME.log."""
        log = self.root / "logs" / f"{name}.log"
        with log.open("wb") as sink:
            self.background.append(
                subprocess.Popen(
                    ["bash", "-c", f"exec {line}"],
                    cwd=self.operator,
                    env=self.env(),
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                )
            )

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}"
            for log in sorted(
                [
                    *(self.root / "logs").glob("*.log"),
                    *(self.root / "var/log/mosquitto").glob("*.log"),
                ]
            )
        )


@pytest.fixture
def site() -> Iterator[Site]:
    """A root Debian's packages would have made: mosquitto's folders owned by its user, its
    configuration file, and systemd's unit folder. World-traversable, so mosquitto reads its
    drop-in after it drops root."""
    root = Path(tempfile.mkdtemp(prefix="imu-journey-"))
    root.chmod(0o755)
    mosquitto = pwd.getpwnam("mosquitto")
    for folder in ("etc/mosquitto/conf.d", "etc/systemd/system", "var/lib/mosquitto",
                   "var/log/mosquitto", "run/mosquitto", "home/operator", "logs"):  # fmt: skip
        (root / folder).mkdir(parents=True)
    for owned in ("var/lib/mosquitto", "var/log/mosquitto", "run/mosquitto"):
        os.chown(root / owned, mosquitto.pw_uid, mosquitto.pw_gid)
    for source in (ROOT / "compose", ROOT / "docs"):  # the operator works in a checkout
        (root / "home" / "operator" / source.name).symlink_to(source)
    running = Site(root, {port: free_port() for port in PORTS})
    (root / "etc/mosquitto/mosquitto.conf").write_text(running.localize(DEBIAN_CONF.read_text()))
    try:
        yield running
    finally:
        for process in reversed(running.background):
            stop_process(process, timeout=15)
        shutil.rmtree(root, ignore_errors=True)


def nodes(site: Site, *, raw: bool = False) -> dict[str, dict]:
    """`imu-fleet nodes --json`, as the operator's own login sees the fleet."""
    done = subprocess.run(
        ["imu-fleet", "nodes", "--json", "--wait", "1", "--config", "fleet.toml"],
        cwd=site.operator, env=site.env(), capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    if raw:
        return {"output": {"stdout": done.stdout, "stderr": done.stderr}}
    rows = orjson.loads(done.stdout) if done.returncode == 0 and done.stdout.strip() else []
    return {row["node_id"]: row for row in rows}


def serving(site: Site, node: str, version: str) -> Callable[[], bool]:
    def check() -> bool:
        row = nodes(site).get(node)
        return bool(row and row["model_state"] == "active" and row["model"]["version"] == version)

    return check


def systemctl(site: Site, line: str) -> None:
    """`systemctl restart mosquitto` as Debian's unit runs it; `enable --now UNIT`: its
    ExecStart from the unit file the runbook copied."""
    words = line.split()
    unit = words[-1]
    if unit == "mosquitto":
        site.start(f"mosquitto -c {site.root}/etc/mosquitto/mosquitto.conf", "mosquitto")
        for conf in (site.root / "etc/mosquitto/conf.d").glob("*.conf"):  # ports and paths
            conf.write_text(site.localize(conf.read_text()))
        for port in ("8883", "8884", "1883"):
            wait_for_port(site.ports[port])
        return
    assert words[1:3] == ["enable", "--now"], line
    unit_file = site.root / "etc" / "systemd" / "system" / f"{unit}.service"
    (exec_start,) = [
        row.partition("=")[2]
        for row in unit_file.read_text().splitlines()
        if row.startswith("ExecStart=")
    ]
    site.start(site.localize(exec_start), unit)
    if unit != "imu-node":
        port = site.ports["8090" if unit == "imu-fleet-dashboard" else "9109"]
        wait_for_port(port, timeout=60)


def apt_get(line: str) -> None:
    """Install only what is missing (CI's .ci/run installs mosquitto already)."""
    packages = [word for word in line.split()[3:] if not word.startswith("-")]
    missing = [
        package
        for package in packages
        if subprocess.run(["dpkg", "-s", package], capture_output=True, check=False).returncode
    ]
    if missing:
        subprocess.run(["apt-get", "install", "-y", *missing], check=True, timeout=600)


def test_the_runbook_runs_as_written(site: Site) -> None:
    blocks = journey()
    lines = [line for block in blocks if block.language == "sh" for line in block.text.splitlines()]
    assert len(lines) > 30, "the journey section lost its commands"
    try:
        for block in blocks:
            if block.language == "toml":
                name, _, body = block.text.partition("\n")
                target = site.operator / site.localize(name.removeprefix("# ").strip())
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(site.localize(body))
                continue
            for raw in block.text.splitlines():
                line = site.localize(raw.strip())
                if not line or line.startswith("#"):
                    continue
                step(site, raw.strip(), line)
    except BaseException:
        print("\n".join(site.outputs[-12:]))
        print(site.logs())
        raise


def step(site: Site, written: str, line: str) -> None:
    """One line of the runbook, and what the operator checks after it."""
    if written.startswith("sudo apt-get install"):
        apt_get(line)
    elif written.startswith("sudo systemctl"):
        systemctl(site, line)
    elif written.endswith(" &"):
        site.start(line.removesuffix(" &"), re.sub(r"\W+", "-", written)[:40])
        if written.startswith("imu-node run"):
            wait_until(lambda: "pi-0043" in nodes(site), timeout=60, what="the second node")
    elif written.startswith("imu-fleet rollout tcn-reference 1.0.0"):
        row = _wait_for_row(site, "pi-0042", "waiting")
        assert row["model"] is None
        site.run(line)
        wait_until(serving(site, "pi-0042", "1.0.0"), timeout=60, what="the first model served")
    elif written.startswith("imu-fleet rollout"):
        output = site.run(line)
        ids = re.findall(r" (\S+) \[\w+\]", output)
        assert ids, output
        site.rollout_id = ids[-1]
        assert serving(site, "pi-0042", "1.1.0")()
    elif written.startswith("imu-fleet rollback"):
        output = site.run(line)
        assert "NOT confirmed" not in output, output
        assert serving(site, "pi-0042", "1.0.0")()
    elif written.startswith("imu-fleet unpin"):
        # the node that joined after the rollback follows the group: the rolled-back-to version
        late = _wait_for_row(site, "pi-0043", "active")
        assert (late["model"]["version"], late["follows"]["scope"]) == ("1.0.0", "group"), late
        site.run(line)
        # unpinned, pi-0042 follows the group too, and the group names 1.0.0, not 1.1.0
        row = _wait_for_row(site, "pi-0042", "active", scope="group")
        assert (row["model"]["version"], row["follows"]["version"]) == ("1.0.0", "1.0.0"), row
    elif written.startswith("imu-fleet dashboard-link"):
        output = site.run(line)
        link = re.search(r"http://\S+\?code=\S+", output)
        assert link, output
    else:
        site.run(line)


def _wait_for_row(site: Site, node: str, state: str, scope: str | None = None) -> dict:
    """The node's row once it reports `state` (and follows `scope`, if given)."""
    found: list[dict] = []

    def there() -> bool:
        row = nodes(site).get(node)
        follows = (row or {}).get("follows") or {}
        if row and row["model_state"] == state and scope in (None, follows.get("scope")):
            found.append(row)
        return bool(found)

    with contextlib.suppress(pytest.fail.Exception):
        wait_until(there, timeout=90, what=f"{node} {state} {scope or ''}")
    assert found, f"{node} is not {state} {scope or ''}: {nodes(site, raw=True)}"
    return found[-1]
