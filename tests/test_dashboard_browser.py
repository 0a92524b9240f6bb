"""The dashboard page in headless Chromium, against a real node, simulated sensors and nodes,
and a real rollout. Saves docs/img/dashboard.png."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.bundle import read_bundle, write_bundle
from common.mqtt.connection import Connection
from fleet.bundles.reference import build_reference_bundle
from fleet.dashboard.app import Dashboard, DashboardSettings
from fleet.distribution import publish_bundle
from fleet.rollout.controller import Controller
from fleet.simulate.nodes import SimulatedFleet
from fleet.simulate.sensors import SensorSimulator
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.programs import require_program
from helpers.waiting import unique, wait_until
from node.tools.local_broker import LocalBroker
from schemas import topics
from schemas.codec import encode
from schemas.manifest import Manifest
from schemas.messages import (
    ErrorKind,
    ErrorReport,
    ModelLifecycle,
    ModelRef,
    NodeModelState,
    NodeState,
    NodeStatus,
)

LABELS = ["rest", "walk", "run", "turn", "stairs", "shake",
          "sit-stand", "trot", "graze", "lie", "groom", "scratch"]  # fmt: skip
TOKEN = "browser-test-token"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "img" / "dashboard.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def labelled(source: Path, out: Path, labels: list[str]) -> Path:
    """A copy of a bundle whose manifest names its motifs."""
    bundle = read_bundle(source)
    manifest = Manifest.model_validate({**bundle.manifest.model_dump(), "motif_labels": labels})
    write_bundle(out, manifest, bundle.files)
    return out


def node_status_payload(node_id: str) -> bytes:
    """An online status, as a node's birth says it."""
    now = time.time()
    return encode(NodeStatus(state=NodeState.ONLINE, node_id=node_id, instance="i1", ts=now,
                             started_at=now, software_version="test"))  # fmt: skip


@pytest.fixture
def site(broker: LocalBroker, tmp_path: Path) -> Iterator[Dashboard]:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    dashboard = Dashboard(DashboardSettings(Connection.of(broker.url), listen="127.0.0.1:0",
                                            token_file=token_file, tick_s=0.2))  # fmt: skip
    dashboard.start()
    assert dashboard.session.wait_connected(10)
    yield dashboard
    dashboard.stop()


@pytest.mark.parametrize("backend", ["onnx"], indirect=True)
def test_the_page_shows_the_fleet_live(  # noqa: PLR0915 (one browser session, many checks)
    site: Dashboard, broker: LocalBroker, start_node: NodeFactory, reference_bundle_path: Path,
    tmp_path: Path, probe: Probe,
) -> None:  # fmt: skip
    chromium = require_program("chromium")
    from playwright.sync_api import sync_playwright

    v1 = labelled(reference_bundle_path, tmp_path / "tcn-1.0.0.tar", LABELS)
    v2 = labelled(build_reference_bundle(tmp_path / "plain-1.1.0.tar", version="1.1.0", seed=8),
                  tmp_path / "tcn-1.1.0.tar", LABELS)  # fmt: skip
    publish_bundle(v2, broker.url)
    node = start_node(model=v1, node_id=unique("pi"), telemetry_interval_s=0.5)
    prefix = unique("sim")
    fleet = SimulatedFleet(broker.url, v1, count=5, prefix=prefix, cache_dir=tmp_path / "cache",
                           telemetry_interval_s=1.0)  # fmt: skip
    sensors = SensorSimulator(broker.url, sensors=4, rate_hz=100, mode="window", hop=10,
                              interval_s=0.1, prefix=unique("imu"))  # fmt: skip
    controller = Controller.connect(broker.url, client_id=unique("ctl"))
    rollout_done = threading.Event()
    try:
        fleet.start()
        sensors.start()
        wait_until(lambda: all((v := controller.view.get(n)) is not None and v.online
                               and v.model is not None for n in fleet.node_ids),
                   timeout=20, what="the simulated nodes")  # fmt: skip
        wait_until(lambda: site.view.sizes()["ethogram_entries"] >= 4 * 90, timeout=20,
                   what="ethograms to fill")  # fmt: skip
        record = controller.start("tcn-reference", "1.1.0", group=f"{prefix}-g0", canary=1,
                                  waves=[50, 100], wave_timeout_s=30)  # fmt: skip
        threading.Thread(
            target=lambda: (controller.run(record), rollout_done.set()), daemon=True
        ).start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            # the token gate: nothing without it, a cookie after the one-time link
            response = page.goto(site.http.url)
            assert response is not None
            assert response.status == 401
            assert page.goto(site.http.url + "events").status == 401  # type: ignore[union-attr]
            assert page.goto(site.http.url + "?code=wrong").status == 401  # type: ignore[union-attr]
            response = page.goto(f"{site.http.url}?code={site.http.gate.new_link()}")
            assert response is not None
            assert response.status == 200
            assert "code" not in page.url  # redirected: the one-time code left the address bar
            page.wait_for_selector("#link.up")

            # the real node's row: its windows/s changes as results arrive
            row = f'tr[data-node="{node.node_id}"]'
            page.wait_for_selector(f"{row} td.wps")
            no_rate = ("\u2013", "0.0")  # the page's dash for "none yet"
            wait_until(lambda: page.inner_text(f"{row} td.wps") not in no_rate, timeout=15,
                       what="the node's windows/s")  # fmt: skip
            # its last hour: a sparkline of windows/s and p95, with a summary on hover
            page.wait_for_selector(f"{row} td.spark svg.spark polyline.wps")
            hover = page.text_content(f"{row} td.spark svg title") or ""
            assert hover.startswith("last hour: windows/s up to"), hover
            assert page.inner_text(f"{row} td.backend") == "onnx"
            assert "tcn-reference 1.0.0" in page.inner_text(f"{row} td.model")
            first = page.inner_text("#stats")
            wait_until(lambda: page.inner_text("#stats") != first, timeout=10, what="new events")

            # ethograms named by the bundle's labels
            page.wait_for_selector(".sensor .now-label")
            names = page.eval_on_selector_all(
                ".sensor .now-label", "els => els.map(e => e.textContent)"
            )
            assert len(names) == 4, names
            assert set(names) <= set(LABELS), names
            bouts = page.eval_on_selector_all(
                ".sensor .bout[title]", "els => els.map(e => e.title)"
            )
            assert bouts
            assert all(t.split(":")[0] in LABELS for t in bouts), bouts

            # the rollout with its waves
            rollout = f'.rollout[data-rollout="{record.rollout_id}"]'
            page.wait_for_selector(rollout)
            assert len(page.query_selector_all(f"{rollout} .wave")) == len(record.waves) == 3
            assert "of 3" in page.inner_text(f"{rollout} .wavecount")
            wait_until(lambda: page.query_selector(f"{rollout} .chip.active") is not None,
                       timeout=20, what="a node active on the new version")  # fmt: skip
            # its timeline: started, each wave, the verdict (as the dashboard saw them)
            wait_until(lambda: "succeeded" in page.inner_text(f"{rollout} ol.timeline"),
                       timeout=30, what="the rollout's verdict in its timeline")  # fmt: skip
            timeline = page.inner_text(f"{rollout} ol.timeline")
            assert "started: canary of 1" in timeline, timeline
            assert "wave 3 started" in timeline, timeline
            assert "wave 4" not in timeline, timeline  # there are three
            page.screenshot(path=str(SCREENSHOT), full_page=True)

            # broker-derived strings are text, never markup
            evil = unique("evil")
            html = "<img src=x onerror=pwned=1>"
            probe.publish(topics.node_model(evil), encode(NodeModelState(
                node_id=evil, ts=time.time(), state=ModelLifecycle.FAILED,
                active=ModelRef(name="<b>bold</b>", version="<script>pwned=1</script>"),
                last_error=html, motif_labels=[html] * 12,
            )), retain=True)  # fmt: skip
            evil_row = f'tr[data-node="{evil}"]'
            page.wait_for_selector(evil_row)
            assert html in page.inner_text(f"{evil_row} td.err")
            assert "<script>pwned=1</script>" in page.inner_text(f"{evil_row} td.model")
            assert page.query_selector("img") is None
            assert page.query_selector("td.model b") is None
            assert page.evaluate("typeof window.pwned") == "undefined"
            probe.publish(topics.node_model(evil), b"", retain=True)

            # a legend says what a node's mark in a wave means
            legend = page.inner_text("#rollout-legend")
            assert "rolled back" in legend
            assert "failed a gate" in legend

            # a sensor restart is an event, apart from faults
            calm = unique("calm")
            probe.publish(topics.node_errors(calm), encode(ErrorReport(
                node_id=calm, ts=time.time(), kind=ErrorKind.SEQUENCE_RESET,
                reason="sensor imu-3 restarted (seq 912 -> 0)",
            )))  # fmt: skip
            probe.publish(topics.node_status(calm), node_status_payload(calm), retain=True)
            page.wait_for_selector(f'tr[data-node="{calm}"] td.err.event')
            assert page.inner_text(f'tr[data-node="{calm}"] td.err').startswith("event:")
            probe.publish(topics.node_status(calm), b"", retain=True)

            # a node that stops is greyed, its figures blanked (not its last windows/s)
            node.stop("test: greyed when stopped")
            page.wait_for_selector(f"{row}.inactive", timeout=15_000)
            for figure in ("wps", "p95", "queue", "temp"):
                assert page.inner_text(f"{row} td.{figure}") == "\u2013", figure

            # phone width: nothing wider than the screen
            page.set_viewport_size({"width": 390, "height": 844})
            page.wait_for_timeout(300)
            assert page.evaluate("document.documentElement.scrollWidth") <= 391
            browser.close()
    finally:
        sensors.stop()
        rollout_done.wait(30)
        controller.close()
        fleet.stop()
