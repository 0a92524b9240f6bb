"""Sites bridged to a fleet broker with mosquitto's own bridges, exactly as `imu-fleet pki bridge`
writes them: three real mosquitto processes on loopback.

The fleet broker runs compose/mosquitto-secure.conf (TLS, client certificates, the generated
ACL). Each site broker runs a loopback listener for its own clients plus the `connection` block
from its bridge kit, and reaches the fleet broker over TLS with the bridge's certificate.

Absence is proved without waiting for a timeout: a site publishes what must not cross, then a
marker that must. One bridge connection carries a site's messages in order, so once the marker
is at the fleet, anything sent before it that was going to cross has crossed.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_broker_security import COMPOSE, NOT_AUTHORIZED, Session, open_session

from common.mqtt.address import BrokerAddress
from common.mqtt.connection import Connection, Credentials
from fleet import pki
from fleet.bundles.reference import build_reference_bundle
from fleet.distribution import publish_bundle
from fleet.pki.local_brokers import fleet_broker_conf, site_broker_conf
from fleet.rollout.commands import Sites, format_nodes, format_record
from fleet.rollout.controller import Controller, plan_waves_by_site
from fleet.rollout.view import NodeView
from helpers.processes import stop_process
from helpers.programs import subprocess_env
from helpers.waiting import wait_until
from node.app import NodeApp
from node.config import load_config
from node.tools.local_broker import free_port, wait_for_port
from schemas import topics
from schemas.control import DesiredModel, NodeOutcome, NodeRolloutState, RolloutRecord, RolloutState
from schemas.messages import NodeState, NodeStatus

pytestmark = pytest.mark.skipif(shutil.which("mosquitto") is None, reason="needs mosquitto")

ACCEPTED = (0, 16)
"""PUBACK codes of an accepted publish: success, and "no matching subscribers"."""
SITES = {"farm-a": ("a1", "sa"), "farm-b": ("b1", "sb")}
"""site -> (its node, the sensor whose results it sends up)."""


@dataclass
class Broker:
    """One running mosquitto: its port for clients, its configuration and log."""

    port: int
    conf: Path
    log: Path
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen(
                ["mosquitto", "-c", str(self.conf)], stdout=sink, stderr=sink
            )
        try:
            wait_for_port(self.port)
        except TimeoutError:
            pytest.fail(f"mosquitto did not start:\n{self.log.read_text()}")
        return self

    def kill(self) -> None:
        """Gone without a goodbye, as a site whose uplink is cut."""
        assert self.process is not None
        stop_process(self.process, signal.SIGKILL)


@dataclass
class Fleet:
    """The fleet broker, its site folder, and the two site brokers bridged to it."""

    layout: pki.Layout
    fleet: Broker
    tls_port: int
    sites: dict[str, Broker]
    kits: dict[str, Path]

    def fleet_session(self, username: str) -> Session:
        """A certificate login on the fleet broker (the operators' `fleet-ctl`, or a bridge's)."""
        files = (self.layout.client_file(username, "crt"), self.layout.client_file(username, "key"))
        session = open_session(self.tls_port, ca=self.layout.ca_cert, cert=files)
        assert session.wait_connack() == 0, f"{username}: {self.fleet.log.read_text()[-2000:]}"
        return session

    def site_session(self, site: str) -> Session:
        """A client of a site broker (its own loopback listener)."""
        session = open_session(self.sites[site].port)
        assert session.wait_connack() == 0
        return session


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("sites")
    layout = pki.Layout(root / "fleet-site")
    pki.init_site(layout.root, site="fleet", hosts=("localhost", "127.0.0.1"))
    pki.add_client(layout.root, "fleet", "ctl")
    pki.add_client(layout.root, "fleet", "ops")  # the fleet CLI's own login
    pki.add_client(layout.root, "fleet", "rollout")  # the rollout controller's
    ports = {"8883": free_port(), "8884": free_port(), "1883": free_port()}
    kits: dict[str, Path] = {}
    for site, (node, sensor) in SITES.items():
        kit = root / f"{site}-kit"
        argv = ["bridge", str(layout.root), site, "--node", node, "--results-for", sensor,
                "--fleet-host", f"localhost:{ports['8883']}", "--out", str(kit),
                "--files-dir", str(kit)]  # fmt: skip
        assert pki.main(argv) == 0
        kits[site] = kit / f"bridge-{site}.conf"
    (root / "fleet-data").mkdir()
    conf = root / "fleet.conf"
    shipped = (COMPOSE / "mosquitto-secure.conf").read_text()
    conf.write_text(fleet_broker_conf(shipped, ports, layout, root / "fleet-data"))
    fleet_broker = Broker(ports["8883"], conf, root / "fleet.log").start()
    for port in ports.values():
        wait_for_port(port)
    sites: dict[str, Broker] = {}
    for site, kit in kits.items():
        port, data = free_port(), root / f"{site}-data"
        data.mkdir()
        (root / f"{site}.conf").write_text(site_broker_conf(port, data, kit.read_text(), shipped))
        sites[site] = Broker(port, root / f"{site}.conf", root / f"{site}.log").start()
    running = Fleet(layout, fleet_broker, ports["8883"], sites, kits)
    try:
        yield running
    finally:
        for broker in (*sites.values(), fleet_broker):
            if broker.process is not None:
                stop_process(broker.process)


def token() -> bytes:
    return uuid.uuid4().hex.encode()


def link(session: Session, site: str) -> bytes | None:
    """The last link state of `site` a session subscribed to fleet/sites/+/link has seen."""
    states = [body for topic, body in session.messages if topic == topics.site_link(site)]
    return states[-1] if states else None


# -- the kit -----------------------------------------------------------------------------------


def test_the_kit_carries_only_the_sites_own_topics(fleet: Fleet) -> None:
    conf = fleet.kits["farm-a"].read_text()
    lines = [line for line in conf.splitlines() if line.startswith("topic ")]
    assert "topic fleet/nodes/a1/status out 1" in lines
    assert "topic imu/sa/motifs out 1" in lines
    assert "topic fleet/groups/+/desired in 1" in lines
    assert not [line for line in lines if "b1" in line or "/window" in line or "/samples" in line]
    assert "notification_topic fleet/sites/farm-a/link" in conf
    assert "bridge_insecure false" in conf
    acl = fleet.layout.acl_file.read_text()
    block = acl.split("user bridge-farm-a\n", 1)[1].split("\n\n", 1)[0]
    assert "topic write fleet/nodes/a1/status" in block
    assert "b1" not in block
    assert "imu/+/window" not in block


# -- links, down and up ------------------------------------------------------------------------


def test_each_site_link_is_up_and_says_so_on_the_fleet(fleet: Fleet) -> None:
    spy = fleet.fleet_session("fleet-ctl")
    try:
        spy.subscribe("fleet/sites/+/link")
        for site in SITES:
            wait_until(lambda site=site: link(spy, site) == b"1", 20, f"{site}'s link up")
    finally:
        spy.close()


def test_desired_state_and_artifacts_go_down_and_stay_retained_at_each_site(fleet: Fleet) -> None:
    ctl = fleet.fleet_session("fleet-ctl")
    order, chunk, only_a1 = token(), token(), token()
    try:
        assert ctl.publish(topics.group_desired("line"), order, retain=True) == 0
        assert ctl.publish(topics.artifact_chunk("m", "9.9.9", 0), chunk, retain=True) == 0
        assert ctl.publish(topics.node_desired("a1"), only_a1, retain=True) == 0
        for site in SITES:
            late = fleet.site_session(site)  # subscribes after the fact: retained at the site
            try:
                late.subscribe(topics.group_desired("+"))
                late.subscribe("fleet/artifacts/#")
                late.subscribe("fleet/nodes/+/desired")
                assert late.wait_for(order, 20), f"{site}: the group order"
                assert late.wait_for(chunk), f"{site}: the artifact chunk"
                if site == "farm-a":
                    assert late.wait_for(only_a1), "farm-a: its node's own order"
                else:  # barrier: farm-b's subscriptions are answered, a1's order never came
                    late.unsubscribe("fleet/nodes/+/desired")
                    assert not late.got(only_a1), "a1's order reached farm-b"
            finally:
                late.close()
    finally:
        ctl.publish(topics.group_desired("line"), b"", retain=True)
        ctl.publish(topics.node_desired("a1"), b"", retain=True)
        ctl.close()


def test_a_site_sends_up_its_nodes_reports_and_chosen_results_and_nothing_else(
    fleet: Fleet,
) -> None:
    spy = fleet.fleet_session("fleet-ctl")  # reads fleet/#, imu/+/window and imu/+/motifs
    site = fleet.site_session("farm-a")
    try:
        for topic_filter in ("fleet/nodes/+/+", "imu/+/motifs", "imu/+/window"):
            spy.subscribe(topic_filter)
        stays = {
            topics.window("sa"): token(),  # sensor data never leaves a site
            topics.motifs("sx"): token(),  # a sensor whose results the site keeps
            topics.node_status("b1"): token(),  # another site's node
        }
        for topic, body in stays.items():
            assert site.publish(topic, body) in ACCEPTED
        goes = {
            topics.node_telemetry("a1"): token(),
            topics.motifs("sa"): token(),
            topics.node_status("a1"): token(),  # last: the marker
        }
        for topic, body in goes.items():
            assert site.publish(topic, body) in ACCEPTED
        for topic, body in goes.items():
            assert spy.wait_for(body, 20), f"{topic} did not reach the fleet"
        crossed = [topic for topic, body in stays.items() if spy.got(body)]
        assert not crossed, f"crossed the bridge: {crossed}"
    finally:
        site.publish(topics.node_status("a1"), b"", retain=True)
        site.close()
        spy.close()


def test_a_site_bridge_login_cannot_speak_for_another_site(fleet: Fleet) -> None:
    """farm-a's bridge certificate in an attacker's hands: farm-a's broker is down, and the
    certificate logs in to the fleet broker as a client of its own."""
    farm_a = fleet.sites["farm-a"]
    assert farm_a.process is not None
    stop_process(farm_a.process)  # its login is one session: the attacker holds it now
    rogue = fleet.fleet_session("bridge-farm-a")
    spy = fleet.fleet_session("fleet-ctl")
    try:
        spy.subscribe("fleet/#")
        refused = {
            topics.node_status("b1"): token(),
            topics.node_model("b1"): token(),
            topics.site_link("farm-b"): token(),
            topics.group_desired("line"): token(),
            topics.node_desired("a1"): token(),
            topics.FLEET_DESIRED: token(),
            topics.artifact_chunk("m", "6.6.6", 0): token(),
        }
        codes = {topic: rogue.publish(topic, body) for topic, body in refused.items()}
        assert set(codes.values()) == {NOT_AUTHORIZED}, codes
        marker = token()
        assert rogue.publish(topics.node_status("a1"), marker) == 0  # its own node: allowed
        assert spy.wait_for(marker)
        assert not [topic for topic, body in refused.items() if spy.got(body)]
    finally:
        rogue.close()
        farm_a.start()
        back, site = token(), fleet.site_session("farm-a")
        wait_until(lambda: site.publish(topics.node_telemetry("a1"), back) in ACCEPTED and
                   spy.wait_for(back, 1), 30, "farm-a's bridge back")  # fmt: skip
        site.close()
        spy.close()


def test_a_lost_link_reads_down_and_the_site_converges_when_it_returns(fleet: Fleet) -> None:
    spy = ctl = fleet.fleet_session("fleet-ctl")  # one login, one session: both roles
    first, rollback = token(), token()
    try:
        spy.subscribe("fleet/sites/+/link")
        wait_until(lambda: link(spy, "farm-b") == b"1", 20, "farm-b's link up")
        assert ctl.publish(topics.group_desired("line"), first, retain=True) == 0
        fleet.sites["farm-b"].kill()
        wait_until(lambda: link(spy, "farm-b") == b"0", 30, "farm-b's link down (its will)")
        assert link(spy, "farm-a") == b"1", "farm-a is not affected"
        # a rollback while farm-b is away
        assert ctl.publish(topics.group_desired("line"), rollback, retain=True) == 0
        fleet.sites["farm-b"].start()
        wait_until(lambda: link(spy, "farm-b") == b"1", 30, "farm-b's link back")
        late = fleet.site_session("farm-b")
        try:
            late.subscribe(topics.group_desired("line"))
            assert late.wait_for(rollback, 20), "farm-b did not converge to the rollback"
            late.unsubscribe(topics.group_desired("line"))
            states = [
                body for topic, body in late.messages if topic == topics.group_desired("line")
            ]
            assert states[-1] == rollback, "a stale order is retained at farm-b"
        finally:
            late.close()
    finally:
        ctl.publish(topics.group_desired("line"), b"", retain=True)
        ctl.close()


# -- the fleet tools see sites -----------------------------------------------------------------


def fleet_nodes(fleet: Fleet) -> dict[str, dict[str, object]]:
    """`imu-fleet nodes --json` against the fleet broker, as an operator (fleet-ops)."""
    layout = fleet.layout
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "nodes", "--json", "--wait", "1",
         "--broker", f"mqtts://localhost:{fleet.tls_port}", "--ca-file", str(layout.ca_cert),
         "--cert-file", str(layout.client_file("fleet-ops", "crt")),
         "--key-file", str(layout.client_file("fleet-ops", "key"))],
        capture_output=True, text=True, timeout=60, env=subprocess_env("onnx"), check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return {row["node_id"]: row for row in json.loads(done.stdout)}


def test_a_node_behind_a_down_link_reads_site_unreachable_not_offline(
    fleet: Fleet, reference_bundle_path: Path, tmp_path: Path
) -> None:
    """A real node at farm-a says its site; the fleet tools group it there, and when the link
    drops they say the site is unreachable (the node may well be serving it)."""
    config = load_config(
        broker=f"mqtt://127.0.0.1:{fleet.sites['farm-a'].port}", node_id="a1", site="farm-a",
        model=reference_bundle_path, backend="onnx", state_dir=tmp_path / "state",
        spool_dir=tmp_path / "spool", cache_dir=tmp_path / "cache",
    )  # fmt: skip
    app = NodeApp.open(config)
    assert app is not None
    app.start()
    try:
        wait_until(
            lambda: fleet_nodes(fleet).get("a1", {}).get("state") == "online", 30,
            "a1's birth at the fleet, through farm-a's bridge",
        )  # fmt: skip
        row = fleet_nodes(fleet)["a1"]
        assert (row["site"], row["site_link"]) == ("farm-a", "up")
        fleet.sites["farm-a"].kill()
        wait_until(
            lambda: fleet_nodes(fleet)["a1"]["state"] == "site unreachable", 30,
            "a1 behind farm-a's down link",
        )  # fmt: skip
        row = fleet_nodes(fleet)["a1"]
        assert row["site_link"] == "DOWN"
        assert row["online"] is True, "the last status that crossed: a1 was serving"
    finally:
        fleet.sites["farm-a"].start()
        app.stop("test finished")


def test_the_nodes_table_groups_by_site_and_names_down_links() -> None:
    def view(node_id: str, site: str | None) -> NodeView:
        status = NodeStatus(state=NodeState.ONLINE, node_id=node_id, instance="i", ts=1.0,
                            site=site)  # fmt: skip
        return NodeView(node_id, status=status)

    nodes = [view("b1", "farm-b"), view("a1", "farm-a"), view("hq1", None)]
    table = format_nodes(nodes, {"farm-a": True, "farm-b": False}).splitlines()
    rows = {line.split()[0]: line for line in table[1:4]}
    assert [line.split()[0] for line in table[1:4]] == ["hq1", "a1", "b1"]  # by site, then id
    assert rows["b1"].split()[1:4] == ["farm-b", "site", "unreachable"]
    assert rows["a1"].split()[1:3] == ["farm-a", "yes"]
    assert "sites (bridge to this broker): farm-a up, farm-b DOWN; 1 nodes behind a down link" \
        in table[-1]  # fmt: skip
    assert "site" not in format_nodes([view("hq1", None)]).splitlines()[0].split()


def test_status_shows_a_rollout_per_site_with_its_link_and_held_nodes() -> None:
    desired = DesiredModel(name="m", version="1.1.0", bundle_sha256="a" * 64, bundle_size=1,
                           issued_at=1.0)  # fmt: skip
    held = "held: site farm-b unreachable (link down)"
    record = RolloutRecord(
        rollout_id="m-1.1.0-x", desired=desired, waves=[["a1"], ["b1", "hq1"]], max_failures=0,
        wave_timeout_s=60, created_at=1.0, updated_at=1.0,
        nodes={
            "a1": NodeOutcome(wave=0, state=NodeRolloutState.ACTIVE),
            "b1": NodeOutcome(wave=1, state=NodeRolloutState.UPDATING, error=held),
            "hq1": NodeOutcome(wave=1, state=NodeRolloutState.UPDATING),
        },
    )  # fmt: skip
    sites = Sites({"a1": "farm-a", "b1": "farm-b", "hq1": None}, {"farm-a": True, "farm-b": False})
    brief = format_record(record, detailed=False, sites=sites).splitlines()
    assert brief[1:] == [
        "  site farm-a (link up): 1 active",
        "  site farm-b (link DOWN): 1 held",
        "  no site: 1 updating",
    ]
    lines = format_record(record, detailed=True, sites=sites).splitlines()
    heads = [line.strip() for line in lines if line.startswith("  site") or "no site" in line]
    assert heads == [
        "site farm-a (link up): 1 active",
        "site farm-b (link DOWN): 1 held",
        "no site: 1 updating",
    ]
    b1 = next(line for line in lines if line.split()[0] == "b1")
    assert lines.index(b1) == lines.index("  site farm-b (link DOWN): 1 held") + 1
    assert held in b1
    unnamed = Sites({"a1": None, "b1": None, "hq1": None}, {})
    assert format_record(record, detailed=False, sites=unnamed).count("\n") == 0


# -- a rollout across sites, and a rollback while one is away ---------------------------------


def fleet_connection(fleet: Fleet, username: str) -> Connection:
    """The fleet broker, with `username`'s certificate."""
    layout = fleet.layout
    return Connection(
        BrokerAddress.parse(f"mqtts://localhost:{fleet.tls_port}"),
        credentials=Credentials(
            ca_file=str(layout.ca_cert),
            cert_file=str(layout.client_file(username, "crt")),
            key_file=str(layout.client_file(username, "key")),
        ),
    )


def site_node(fleet: Fleet, site: str, node: str, bundle: Path, root: Path, group: str) -> NodeApp:
    """A real node at `site`, on its site broker, following `group`."""
    config = load_config(
        broker=f"mqtt://127.0.0.1:{fleet.sites[site].port}", node_id=node, site=site,
        group=group, model=bundle, backend="onnx", state_dir=root / node / "state",
        spool_dir=root / node / "spool", cache_dir=root / node / "cache",
        telemetry_interval_s=0.5,
    )  # fmt: skip
    app = NodeApp.open(config)
    assert app is not None
    app.start()
    return app


def test_a_rollout_crosses_sites_and_a_rollback_reaches_the_site_that_was_away(
    fleet: Fleet, reference_bundle_path: Path, tmp_path: Path
) -> None:
    """The operator's journey across two bridged sites: artifacts published once on the fleet
    broker, a rollout whose waves reach a node at each site, then a rollback issued while
    farm-b's link is down. The controller confirms only farm-a's node and names the other; when
    farm-b is back, its node runs the version the fleet finally chose."""
    connection = fleet_connection(fleet, "fleet-rollout")
    newer = build_reference_bundle(tmp_path / "1.1.0.tar", version="1.1.0", seed=8)
    publish_bundle(newer, connection)  # retained on the fleet broker; crosses each link once
    group = "line"
    nodes = {"farm-a": "a1", "farm-b": "b1"}
    apps = {site: site_node(fleet, site, node, reference_bundle_path, tmp_path, group)
            for site, node in nodes.items()}  # fmt: skip
    controller = Controller.connect(connection, client_id="fleet-rollout")
    try:
        wait_until(
            lambda: all((v := controller.view.get(n)) is not None and v.online and v.model
                        for n in nodes.values())
            and controller.artifact("tcn-reference", "1.1.0") is not None,
            30, "the controller to see both sites' nodes and the published version",
        )  # fmt: skip
        record = controller.start("tcn-reference", "1.1.0", group=group, canary=1, waves=[100],
                                  wave_timeout_s=20)  # fmt: skip
        final = controller.run(record)
        assert final.state is RolloutState.SUCCEEDED, final.reason
        assert {app.worker.pipeline.ref.version for app in apps.values()} == {"1.1.0"}
        fleet.sites["farm-b"].kill()  # farm-b's uplink is cut
        rolled = controller.take_over(final, "rollback")
        assert apps["farm-a"].worker.pipeline.ref.version == "1.0.0"
        assert "rolled back 1 of 2 moved nodes; not confirmed: b1" in (rolled.reason or ""), (
            rolled.reason
        )
        assert apps["farm-b"].worker.pipeline.ref.version == "1.1.0"  # away: not reached yet
        fleet.sites["farm-b"].start()  # back: the bridge delivers what the fleet queued for it
        wait_until(
            lambda: apps["farm-b"].worker.pipeline.ref.version == "1.0.0", 60,
            "farm-b's node to converge to the rollback",
        )  # fmt: skip
        assert {app.worker.pipeline.ref.version for app in apps.values()} == {"1.0.0"}
    finally:
        controller.unpin(list(nodes.values()))  # the rollback's node-level orders
        controller.close()
        for app in apps.values():
            app.stop("test finished")


def test_waves_by_site_put_a_canary_in_one_site_then_that_site_then_each_other_site() -> None:
    sites = {"farm-b": ["b2", "b1"], "farm-a": ["a2", "a1", "a3"], "": ["hq1"], "farm-c": ["c1"]}
    assert plan_waves_by_site(sites, canary=1) == [["a1"], ["a2", "a3"], ["b1", "b2"], ["c1"],
                                                   ["hq1"]]  # fmt: skip
    assert plan_waves_by_site({"farm-a": ["a1"]}, canary=1) == [["a1"]]
    assert plan_waves_by_site({"": ["n2", "n1"]}, canary=1) == [["n1"], ["n2"]]
    assert plan_waves_by_site({}, canary=1) == []


def test_a_rollout_by_site_holds_a_site_whose_link_is_down_and_finishes_when_it_returns(
    fleet: Fleet, reference_bundle_path: Path, tmp_path: Path
) -> None:
    """farm-b's link is down when its wave comes: its node is held past the wave timeout,
    neither failed (no rollback of farm-a) nor counted as done; when the link returns, the
    queued order reaches it, it reports the new version, and the rollout succeeds."""
    connection = fleet_connection(fleet, "fleet-rollout")
    newer = build_reference_bundle(tmp_path / "1.1.0.tar", version="1.1.0", seed=8)
    publish_bundle(newer, connection)
    group, nodes = "held", {"farm-a": "a1", "farm-b": "b1"}
    apps = {site: site_node(fleet, site, node, reference_bundle_path, tmp_path, group)
            for site, node in nodes.items()}  # fmt: skip
    controller = Controller.connect(connection, client_id="fleet-rollout")
    ran: list[RolloutRecord] = []
    try:
        wait_until(
            lambda: all((v := controller.view.get(n)) is not None and v.online and v.model
                        for n in nodes.values())
            and controller.artifact("tcn-reference", "1.1.0") is not None,
            30, "the controller to see both sites' nodes and the published version",
        )  # fmt: skip
        record = controller.start("tcn-reference", "1.1.0", group=group, canary=1, by_site=True,
                                  wave_timeout_s=3, site_hold_s=300)  # fmt: skip
        assert record.waves == [["a1"], ["b1"]]
        fleet.sites["farm-b"].kill()
        wait_until(lambda: controller.view.links().get("farm-b") is False, 30, "farm-b down")
        driver = threading.Thread(target=lambda: ran.append(controller.run(record)), daemon=True)
        driver.start()

        def held() -> bool:
            latest = controller.record(record.rollout_id)
            return latest is not None and (latest.nodes["b1"].error or "").startswith("held:")

        wait_until(held, 60, "b1 held behind farm-b's down link")
        latest = controller.record(record.rollout_id)
        assert latest is not None
        assert latest.state is RolloutState.RUNNING
        assert latest.nodes["b1"].state is NodeRolloutState.UPDATING  # neither failed nor done
        assert latest.nodes["a1"].state is NodeRolloutState.ACTIVE
        fleet.sites["farm-b"].start()
        driver.join(120)
        assert ran, "the rollout did not finish after farm-b came back"
        assert ran[0].state is RolloutState.SUCCEEDED, ran[0].reason
        assert {app.worker.pipeline.ref.version for app in apps.values()} == {"1.1.0"}
    finally:
        controller.session.publish(topics.group_desired(group), b"", retain=True)
        controller.close()
        for app in apps.values():
            app.stop("test finished")


def test_a_site_down_past_its_hold_fails_the_wave_and_ends_on_the_rollback(
    fleet: Fleet, reference_bundle_path: Path, tmp_path: Path
) -> None:
    """The hold is bounded: past it, the node behind the down link fails, the rollout rolls
    back, and when the site returns its node takes the queued orders in turn and ends on the
    version the fleet finally chose (its previous one)."""
    connection = fleet_connection(fleet, "fleet-rollout")
    newer = build_reference_bundle(tmp_path / "1.1.0.tar", version="1.1.0", seed=8)
    publish_bundle(newer, connection)
    group, nodes = "bounded", {"farm-a": "a1", "farm-b": "b1"}
    apps = {site: site_node(fleet, site, node, reference_bundle_path, tmp_path, group)
            for site, node in nodes.items()}  # fmt: skip
    controller = Controller.connect(connection, client_id="fleet-rollout")
    try:
        wait_until(
            lambda: all((v := controller.view.get(n)) is not None and v.online and v.model
                        for n in nodes.values())
            and controller.artifact("tcn-reference", "1.1.0") is not None,
            30, "the controller to see both sites' nodes and the published version",
        )  # fmt: skip
        record = controller.start("tcn-reference", "1.1.0", group=group, canary=1, by_site=True,
                                  wave_timeout_s=3, site_hold_s=1)  # fmt: skip
        fleet.sites["farm-b"].kill()
        wait_until(lambda: controller.view.links().get("farm-b") is False, 30, "farm-b down")
        final = controller.run(record)
        assert final.state is RolloutState.FAILED
        assert final.nodes["b1"].error == (
            "site farm-b stayed unreachable past the wave timeout and its hold"
        )
        assert "not confirmed: b1" in (final.reason or ""), final.reason
        assert apps["farm-a"].worker.pipeline.ref.version == "1.0.0"
        fleet.sites["farm-b"].start()
        wait_until(
            lambda: apps["farm-b"].worker.pipeline.ref.version == "1.0.0"
            and (v := controller.view.get("b1")) is not None and v.model is not None
            and v.model.active is not None and v.model.active.version == "1.0.0",
            60, "b1 on the version the fleet finally chose",
        )  # fmt: skip
    finally:
        controller.unpin(list(nodes.values()))
        controller.close()
        for app in apps.values():
            app.stop("test finished")


def test_after_a_fleet_broker_restart_the_bridges_return_and_retained_state_holds(
    fleet: Fleet,
) -> None:
    """The other end: the fleet broker restarts (clean stop, its persistence kept). Its
    retained orders survive, both site bridges reconnect by themselves, reports cross up again
    and a new order crosses down to both sites."""
    order, later = token(), token()
    ctl = fleet.fleet_session("fleet-ctl")
    assert ctl.publish(topics.group_desired("restart"), order, retain=True) == 0
    ctl.close()
    assert fleet.fleet.process is not None
    stop_process(fleet.fleet.process)
    fleet.fleet.start()
    spy = fleet.fleet_session("fleet-ctl")
    sites = {site: fleet.site_session(site) for site in SITES}
    try:
        spy.subscribe(topics.group_desired("restart"))
        assert spy.wait_for(order), "the retained order did not survive the restart"
        spy.subscribe("fleet/nodes/+/telemetry")
        for site, (node, _) in SITES.items():
            marker = token()

            def crossed(site: str = site, node: str = node, marker: bytes = marker) -> bool:
                sites[site].publish(topics.node_telemetry(node), marker)
                return spy.wait_for(marker, 1)

            wait_until(crossed, 90, f"{site}'s bridge back after the fleet broker's restart")
        assert spy.publish(topics.group_desired("restart"), later, retain=True) == 0
        for site, session in sites.items():
            session.subscribe(topics.group_desired("restart"))
            assert session.wait_for(later, 20), f"{site}: the order given after the restart"
    finally:
        spy.publish(topics.group_desired("restart"), b"", retain=True)
        spy.close()
        for session in sites.values():
            session.close()


def test_a_killed_fleet_broker_returns_with_what_it_saved_and_the_sites_follow_it(
    fleet: Fleet,
) -> None:
    """The fleet broker killed, not stopped: mosquitto writes its retained messages to disk on
    its autosave (60 s), on SIGUSR1 and on a clean stop, so an order given after the last save
    is gone when it returns. The sites then follow what the fleet broker holds: each bridge
    subscribes again and gets the saved order, retained, in place of the newer one. Publishing
    the fleet's choice again (the controller service renews its orders) brings every site to it.
    """
    topic = topics.group_desired("crash")
    saved, lost = token(), token()
    ctl = fleet.fleet_session("fleet-ctl")
    sites = {site: fleet.site_session(site) for site in SITES}
    try:
        for session in sites.values():
            session.subscribe(topic)
        assert ctl.publish(topic, saved, retain=True) == 0
        for site, session in sites.items():
            assert session.wait_for(saved, 20), f"{site}: the first order"
        assert fleet.fleet.process is not None
        database = fleet.fleet.conf.parent / "fleet-data" / "mosquitto.db"
        before = database.stat().st_mtime_ns if database.exists() else 0
        fleet.fleet.process.send_signal(signal.SIGUSR1)  # mosquitto saves its database now
        wait_until(lambda: database.exists() and database.stat().st_mtime_ns > before, 10,
                   "the fleet broker's save")  # fmt: skip
        assert ctl.publish(topic, lost, retain=True) == 0
        for site, session in sites.items():
            assert session.wait_for(lost, 20), f"{site}: the second order"
        ctl.close()
        fleet.fleet.kill()
        fleet.fleet.start()
        spy = ctl = fleet.fleet_session("fleet-ctl")
        spy.subscribe(topic)
        assert spy.wait_for(saved), "the saved order is what the fleet broker holds"
        assert lost not in [body for t, body in spy.messages if t == topic]
        for site in SITES:
            fresh = fleet.site_session(site)
            try:
                fresh.subscribe(topic)
                wait_until(lambda fresh=fresh: retained_now(fresh, topic) == saved, 90,
                           f"{site} follows the fleet broker's saved order")  # fmt: skip
            finally:
                fresh.close()
        assert ctl.publish(topic, lost, retain=True) == 0  # the fleet's choice, given again
        for site in SITES:
            fresh = fleet.site_session(site)
            try:
                fresh.subscribe(topic)
                wait_until(lambda fresh=fresh: retained_now(fresh, topic) == lost, 30,
                           f"{site} holds the fleet's choice again")  # fmt: skip
            finally:
                fresh.close()
    finally:
        ctl.publish(topic, b"", retain=True)
        ctl.close()
        for session in sites.values():
            session.close()


def retained_now(session: Session, topic: str) -> bytes | None:
    """What a site holds retained on `topic`: the newest message `session` got there."""
    bodies = [body for t, body in session.messages if t == topic]
    return bodies[-1] if bodies else None
