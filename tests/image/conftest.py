"""The built image and the compose stacks, run for real under podman and podman-compose.

`scripts/test-image` builds the Dockerfile, then runs these tests with IMU_TEST_IMAGE naming the
image; without it (the normal `scripts/test` run) they are not collected: they need root,
podman and a built image. The stacks are compose/edge.yml (broker and node) and the dashboard
of compose/fleet.yml pointed at that broker: the "one broker per site" set-up of fleet.yml's
header.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from helpers.podman import (
    EDGE,
    EDGE_PROJECT,
    FLEET,
    FLEET_PROJECT,
    Site,
    compose,
    make_site,
    podman,
    wait_healthy,
)

IMAGE = os.environ.get("IMU_TEST_IMAGE")
collect_ignore_glob = [] if IMAGE else ["test_*.py"]


@pytest.fixture(scope="session")
def image() -> str:
    """The image scripts/test-image built."""
    assert IMAGE
    podman("image", "exists", IMAGE)
    return IMAGE


@pytest.fixture(scope="session")
def stacks(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """compose/edge.yml up (broker and node, on ONNX Runtime: no /dev/hailo0 here), then the
    dashboard of compose/fleet.yml on that broker; both projects removed afterwards."""
    root = tmp_path_factory.mktemp("image-site")
    root.chmod(0o755)
    site = make_site(root)
    # This machine has no Hailo chip: drop the device the way Compose files do (`!reset`, which
    # Docker Compose >= 2.24 and podman-compose both take). PYTHONVERBOSE makes the node log
    # each module it loads, and from where: a module compiled at run time shows (see
    # test_serving_node_compiles_nothing).
    no_hailo = root / "no-hailo.yml"
    no_hailo.write_text(
        'services:\n  node:\n    devices: !reset []\n    environment:\n      PYTHONVERBOSE: "1"\n'
    )
    edge = [*EDGE, "-f", str(no_hailo)]
    fleet = FLEET

    def down() -> None:
        for project in (fleet, edge):
            compose(site, *project, "down", "-v", "-t", "30", check=False, timeout=180)

    down()  # what an interrupted earlier run left (containers keep their names)
    try:
        compose(site, *edge, "up", "-d", "--no-build")
        wait_healthy(f"{EDGE_PROJECT}_mosquitto_1")
        wait_healthy(f"{EDGE_PROJECT}_node_1")
        compose(site, *fleet, "up", "-d", "--no-build", "--no-deps", "fleet-dashboard")
        wait_healthy(f"{FLEET_PROJECT}_fleet-dashboard_1")
        yield site
    finally:
        down()
