"""The user's mistakes get one line that says what to fix, never a traceback (the operator's
report: a certificate/key mismatch, `--model DIRECTORY`, `imu-node config | head` and a wrong
node id each printed a traceback or nothing useful)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleet.pki import add_client, init_site
from fleet.pki.registry import Layout
from helpers.programs import subprocess_env
from node.tools.local_broker import free_port


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    layout = Layout(tmp_path_factory.mktemp("mistakes") / "site")
    init_site(layout.root, site="mistakes", hosts=("localhost",))
    for name in ("n1", "n2"):
        add_client(layout.root, "node", name)
    return layout


def cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env("onnx"),
        check=False,
    )


def one_line(done: subprocess.CompletedProcess[str], program: str) -> str:
    """The one message the CLI said (log lines of JSON aside; a settings error lists its
    fields on the lines below it), with no traceback."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    said = [i for i, line in enumerate(lines) if line.startswith(f"{program}:")]
    assert len(said) == 1, done.stderr
    return "\n".join(lines[said[0] :])


def test_a_directory_as_the_model(tmp_path: Path) -> None:
    done = cli("node.cli", "run", "--model", str(tmp_path), "--node-id", "m1")
    assert done.returncode == 1
    assert "Is a directory" in one_line(done, "imu-node")


def test_a_certificate_and_a_key_that_do_not_belong_together(
    site: Layout, reference_bundle_path: Path
) -> None:
    done = cli(
        "node.cli", "run", "--model", str(reference_bundle_path), "--node-id", "n1",
        "--broker", f"mqtts://localhost:{free_port()}", "--ca-file", str(site.ca_cert),
        "--cert-file", str(site.client_file("node-n1", "crt")),
        "--key-file", str(site.client_file("node-n2", "key")),
    )  # fmt: skip
    assert done.returncode == 1
    assert "do not belong together" in one_line(done, "imu-node")


def test_a_node_id_that_is_not_its_certificates(site: Layout) -> None:
    done = cli(
        "node.cli", "config", "--node-id", "n7", "--broker", "mqtts://localhost:8883",
        "--ca-file", str(site.ca_cert), "--cert-file", str(site.client_file("node-n1", "crt")),
        "--key-file", str(site.client_file("node-n1", "key")),
    )  # fmt: skip
    assert done.returncode == 2
    assert "was made for 'node-n1'" in one_line(done, "imu-node")


def test_output_piped_into_head_ends_quietly() -> None:
    done = subprocess.run(
        f"{sys.executable} -m node.cli config --node-id m2 | head -1",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
        env=subprocess_env("onnx"),
        check=False,
    )
    assert done.stdout.strip() == "{"
    assert "Traceback" not in done.stderr
    assert "BrokenPipe" not in done.stderr


def test_a_broker_nobody_listens_on() -> None:
    done = cli("fleet.cli", "nodes", "--wait", "0", "--broker", f"mqtt://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    line = one_line(done, "imu-fleet")
    assert "cannot connect" in line
    assert "listening" in line or "running" in line
