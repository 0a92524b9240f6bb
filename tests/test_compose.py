"""The shipped broker configuration loads in a real mosquitto and keeps TCP_NODELAY on."""

from __future__ import annotations

import subprocess
from pathlib import Path

from node.tools.local_broker import free_port, wait_for_port

COMPOSE = Path(__file__).resolve().parents[1] / "compose"


def test_shipped_mosquitto_conf_starts_a_broker(tmp_path: Path) -> None:
    conf = (COMPOSE / "mosquitto.conf").read_text()
    assert "set_tcp_nodelay true" in conf
    port = free_port()
    local = conf.replace("listener 1883", f"listener {port} 127.0.0.1").replace(
        "/mosquitto/data/", f"{tmp_path}/"
    )
    local += "\nuser root\n"  # mosquitto started as root would switch to an unprivileged user
    (tmp_path / "mosquitto.conf").write_text(local)
    process = subprocess.Popen(
        ["mosquitto", "-c", str(tmp_path / "mosquitto.conf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, timeout=10)
        assert process.poll() is None
    finally:
        process.terminate()
        output, _ = process.communicate(timeout=10)
    assert b"Error" not in output, output.decode()
