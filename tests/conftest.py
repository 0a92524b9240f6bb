"""Shared fixtures: a real mosquitto per test session, the reference bundle, nodes, MQTT probes.

Helpers that tests import by name (Probe, wait_until, unique, ...) are in tests/helpers/.
Node tests run once per backend (`backend` fixture): on ONNX Runtime, and "on Hailo" through the
`hailo_platform` stand-in in tests/hailo_standin (put on sys.path here, and on PYTHONPATH for
nodes started as subprocesses), with a bundle whose stand-in HEF runs the same ONNX twin.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from common.bundle import Bundle, read_bundle
from fleet.bundles.reference import build_reference_bundle
from node.app import NodeApp
from node.config import load_config
from node.tools.local_broker import LocalBroker
from schemas import topics

sys.path.insert(0, str(Path(__file__).resolve().parent / "hailo_standin"))

from hailo_standin import faults
from hailo_standin.bundles import hailo_bundle
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.waiting import unique

BACKENDS = ("onnx", "hailo")

INTEGRATION_FIXTURES = frozenset(
    {"broker", "probe", "start_node", "secure_broker", "site", "rabbit", "cluster"}
)
"""Fixtures that start a broker, a node or another program: a test using one (directly or
through another fixture) is an integration test."""
INTEGRATION_SOURCE = re.compile(
    r"\bsubprocess\b|LocalBroker\(|RabbitCluster|require_program|sys\.executable|playwright"
    r"|^from bench\b",
    re.MULTILINE,
)
"""A test module that starts programs itself (or drives a browser): all of it is integration."""
LEFTOVER_WAIT_S = 5.0


def pytest_configure(config: pytest.Config) -> None:
    """Declare the tier marker (tests get it automatically, below)."""
    config.addinivalue_line(
        "markers",
        "integration: needs a broker, a subprocess, a browser or a cluster (not in the fast tier;"
        " set automatically by tests/conftest.py)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs a real broker, a process, a browser or a cluster
    `integration`; `scripts/test --fast` runs the others (`-m "not integration"`)."""
    starts_programs: dict[Path, bool] = {}
    for item in items:
        path = Path(str(item.fspath))
        if path not in starts_programs:
            starts_programs[path] = bool(INTEGRATION_SOURCE.search(path.read_text()))
        fixtures = set(getattr(item, "fixturenames", ()))
        if starts_programs[path] or fixtures & INTEGRATION_FIXTURES:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _fast_tier_starts_nothing(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the fast tier (IMU_TEST_TIER=fast), a test that starts a process fails, saying it
    belongs in the full tier: the automatic marking cannot go wrong silently."""
    if os.environ.get("IMU_TEST_TIER") != "fast":
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        pytest.fail(
            f"{request.node.nodeid} starts a process in the fast tier: give it a fixture of "
            "INTEGRATION_FIXTURES or import subprocess in its module (tests/conftest.py)"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """No test may leave a process behind: whatever is still a child of this run a few seconds
    after the last test is killed, listed, and fails the run."""
    me = psutil.Process()
    deadline = time.monotonic() + LEFTOVER_WAIT_S
    left = me.children(recursive=True)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [child for child in me.children(recursive=True) if child.is_running()]
    if not left:
        return
    names = []
    for child in left:
        with contextlib.suppress(psutil.Error):
            names.append(f"{child.pid} {' '.join(child.cmdline())[:160]}")
            child.kill()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(
            f"FAILED: {len(names)} process(es) outlived the tests (killed now):", red=True
        )
        for name in names:
            reporter.write_line(f"  {name}", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session", autouse=True)
def state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Nodes (in process or spawned) keep their result spools here, not in the home folder."""
    folder = tmp_path_factory.mktemp("state")
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture(scope="session")
def broker() -> Iterator[LocalBroker]:
    """One real mosquitto on a free loopback port for the whole session."""
    if not shutil.which("mosquitto"):
        pytest.fail("mosquitto is required for the tests: apt-get install -y mosquitto")
    with LocalBroker("mosquitto") as running:
        yield running


@pytest.fixture(scope="session")
def reference_bundle_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference model as a bundle file, built once per session."""
    return build_reference_bundle(tmp_path_factory.mktemp("bundles") / "tcn-reference-1.0.0.tar")


@pytest.fixture(scope="session")
def reference_bundle(reference_bundle_path: Path) -> Bundle:
    """The verified reference bundle."""
    return read_bundle(reference_bundle_path)


@pytest.fixture(scope="session")
def hailo_bundle_path(reference_bundle: Bundle, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference bundle plus a stand-in HEF (uint8 outputs scaled to the calibration range)."""
    out = tmp_path_factory.mktemp("bundles") / "tcn-reference-hailo-1.0.0.tar"
    hailo_bundle(reference_bundle, out)
    return out


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each node test runs on ONNX Runtime and on the Hailo stand-in."""
    return str(request.param)


@pytest.fixture(scope="session")
def serving_bundle_path(backend: str, reference_bundle_path: Path, hailo_bundle_path: Path) -> Path:
    """The bundle a node on `backend` serves."""
    return hailo_bundle_path if backend == "hailo" else reference_bundle_path


@pytest.fixture
def probe(broker: LocalBroker) -> Iterator[Probe]:
    """A recording MQTT client on the session broker."""
    client = Probe(broker.url)
    yield client
    client.close()


@pytest.fixture
def start_node(
    broker: LocalBroker,
    backend: str,
    serving_bundle_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[NodeFactory]:
    """Start nodes on the session broker; each is stopped at the end of the test.

    The factory returns once the node's birth message and model state are on the broker, which
    the broker orders after the node's subscriptions: windows published from then on are served,
    and a later subscriber gets both as retained messages.
    """
    apps: list[NodeApp] = []

    def start(**settings: Any) -> NodeApp:
        settings.setdefault("node_id", unique("node"))
        settings.setdefault("model", serving_bundle_path)
        settings.setdefault("backend", backend)
        settings.setdefault("broker", broker.url)
        settings.setdefault("telemetry_interval_s", 0.5)
        # bundles the tests write live under pytest's temp folder: file:// may point there
        settings.setdefault("file_url_root", tmp_path_factory.getbasetemp())
        app = NodeApp.open(load_config(**settings))
        config = app.config
        watcher = Probe(config.broker).subscribe(
            topics.node_status(app.node_id), topics.node_model(app.node_id)
        )
        app.start()
        apps.append(app)
        watcher.wait_for(
            topics.node_status(app.node_id),
            where=lambda m: m.json()["instance"] == app.instance and m.json()["state"] == "online",
        )
        watcher.wait_for(topics.node_model(app.node_id))
        watcher.close()
        return app

    yield start
    for app in apps:
        app.stop("test finished")
    faults.reset()
