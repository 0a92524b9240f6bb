"""Attacks on the control plane, each refused, reported and survived (docs/security.md).

A node with a trust key acts only on desired states signed by the fleet for the very topic they
arrive on, newer than what it already followed there, and unexpired; fetching a bundle cannot
read outside an allowed folder, run forever or fill memory. After every attack the node still
serves windows and still follows a valid desired state.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import psutil
import pytest
from test_node_e2e import raw_window

from common.bundle import read_bundle
from common.signing import SignatureError, generate_keys, load_private_key, sign_desired
from fleet.bundles.builder import sign_bundle
from fleet.bundles.reference import build_reference_bundle
from fleet.desired import cleared, desired_for, desired_topic, scoped
from fleet.distribution import publish_bundle
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.waiting import unique, wait_until
from node.app import NodeApp
from node.tools.local_broker import LocalBroker
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel

pytestmark = pytest.mark.parametrize("backend", ["onnx"], indirect=True)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fleet-keys")
    generate_keys(folder)
    return folder


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory, keys: Path) -> dict[str, Path]:
    """Reference bundles 1.0.0 (what nodes start on), 1.1.0 and 1.2.0, signed by the fleet."""
    folder = tmp_path_factory.mktemp("signed")
    out = {}
    for version, seed in (("1.0.0", 0), ("1.1.0", 8), ("1.2.0", 9)):
        plain = build_reference_bundle(folder / f"plain-{version}.tar", version=version, seed=seed)
        bundle = sign_bundle(read_bundle(plain), keys / "fleet.key", folder / f"{version}.tar")
        assert bundle.path is not None
        out[version] = bundle.path
    return out


@pytest.fixture
def strict(
    start_node: NodeFactory, broker: LocalBroker, probe: Probe, signed: dict[str, Path],
    keys: Path, tmp_path: Path,
) -> tuple[NodeApp, str]:  # fmt: skip
    """A node that trusts only the fleet key, on 1.0.0, its topics watched; bundles published."""
    group = unique("grp")
    app = start_node(model=signed["1.0.0"], trust_key=keys / "fleet.pub", group=group,
                     cache_dir=tmp_path / "cache")  # fmt: skip
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_model(app.node_id),
                    topics.node_errors(app.node_id))  # fmt: skip
    for version in ("1.1.0", "1.2.0"):
        publish_bundle(signed[version], broker.url)
    return app, sensor


def issue(
    app: NodeApp, bundle: Path, keys: Path | None, level: str = "node", **kw: object
) -> DesiredModel:
    """A desired state for `bundle`, issued now for `level` of `app` (signed with `keys`)."""
    target = {"node": app.node_id, "group": app.config.group, "fleet": ""}[level]
    key = load_private_key(keys / "fleet.key") if keys is not None else None
    return scoped(desired_for(bundle).model_copy(update=kw), level, target, key)


def signed_clear(app: NodeApp, keys: Path, level: str = "node") -> DesiredModel:
    """A clear of one of `app`'s levels, issued now and signed by the fleet."""
    target = {"node": app.node_id, "group": app.config.group, "fleet": ""}[level]
    return scoped(cleared(), level, target, load_private_key(keys / "fleet.key"))


def put(
    probe: Probe, app: NodeApp, desired: DesiredModel | bytes, level: str | None = None
) -> None:
    """Publish on `level` (default: the scope the message was issued for, else node)."""
    if level is None:
        issued = desired.scope if isinstance(desired, DesiredModel) else None
        level = issued or "node"
    target = {"node": app.node_id, "group": app.config.group, "fleet": ""}[level]
    payload = desired if isinstance(desired, bytes) else encode(desired)
    probe.publish(desired_topic(level, target), payload, retain=True)


def active(probe: Probe, app: NodeApp, version: str, count: int = 1, timeout: float = 30) -> dict:
    """The `count`-th model state saying `version` is active."""

    def matches(m: object) -> bool:
        body = m.json()  # type: ignore[attr-defined]
        return body["state"] == "active" and body["active"]["version"] == version

    found = probe.wait_for(topics.node_model(app.node_id), count, timeout, where=matches)
    return found[count - 1].json()


def refusal(probe: Probe, app: NodeApp, text: str, timeout: float = 15) -> dict:
    def matches(m: object) -> bool:
        body = m.json()  # type: ignore[attr-defined]
        return body["kind"] == "desired_refused" and text in body["reason"]

    return probe.wait_for(topics.node_errors(app.node_id), where=matches, timeout=timeout)[0].json()


def model_failure(probe: Probe, app: NodeApp, text: str, timeout: float = 30) -> dict:
    def matches(m: object) -> bool:
        body = m.json()  # type: ignore[attr-defined]
        return body["state"] == "failed" and text in (body["last_error"] or "")

    return probe.wait_for(topics.node_model(app.node_id), where=matches, timeout=timeout)[-1].json()


def serves(probe: Probe, sensor: str, seq: int) -> str:
    """Send one window; the version of the model that answered."""
    probe.publish(topics.window(sensor), orjson.dumps({"x": raw_window(seq).tolist(), "seq": seq}))
    found = probe.wait_for(topics.motifs(sensor), where=lambda m: m.json()["seq"] == seq)
    return str(found[0].json()["model"]["version"])


# -- forged, moved, replayed, expired --------------------------------------------------------------


def test_an_unsigned_desired_state_is_refused_and_a_pin_cannot_freeze_the_node(
    strict: tuple[NodeApp, str], probe: Probe, signed: dict[str, Path], keys: Path
) -> None:
    app, sensor = strict
    put(probe, app, issue(app, signed["1.0.0"], None))  # an attacker pins the current version
    refusal(probe, app, "unsigned desired state")
    put(probe, app, issue(app, signed["1.1.0"], keys, level="group"))  # the fleet rolls on
    state = active(probe, app, "1.1.0")
    assert state["following"]["scope"] == "group"  # the pin did not take
    assert state["following"]["key_id"] is not None
    assert serves(probe, sensor, 1) == "1.1.0"
    put(probe, app, signed_clear(app, keys, "group"))


def test_a_replayed_older_signed_desired_state_is_refused(
    strict: tuple[NodeApp, str], probe: Probe, signed: dict[str, Path], keys: Path
) -> None:
    app, sensor = strict
    captured = issue(app, signed["1.1.0"], keys)  # the attacker records this one
    put(probe, app, captured)
    active(probe, app, "1.1.0")
    put(probe, app, issue(app, signed["1.2.0"], keys))
    active(probe, app, "1.2.0")
    put(probe, app, captured)  # weeks later
    report = refusal(probe, app, "a replayed or stale message")
    assert "already followed one issued" in report["reason"]
    assert serves(probe, sensor, 2) == "1.2.0"


def test_a_replay_after_the_pin_was_cleared_is_refused(
    strict: tuple[NodeApp, str], probe: Probe, signed: dict[str, Path], keys: Path
) -> None:
    """The rollback a rollout once pinned, replayed after the rollout cleared it."""
    app, sensor = strict
    put(probe, app, issue(app, signed["1.1.0"], keys, level="group"))
    active(probe, app, "1.1.0")
    rollback = issue(app, signed["1.0.0"], keys, rollback=True)
    put(probe, app, rollback)
    active(probe, app, "1.0.0")
    time.sleep(0.05)
    put(probe, app, signed_clear(app, keys))  # the operator clears the pin: back to 1.1.0
    assert active(probe, app, "1.1.0", count=2)["following"]["scope"] == "group"
    put(probe, app, rollback)  # replayed: would downgrade the node again
    assert "saw it cleared" in refusal(probe, app, "a replayed or stale message")["reason"]
    assert serves(probe, sensor, 3) == "1.1.0"
    put(probe, app, signed_clear(app, keys, "group"))


def test_a_message_moved_to_another_topic_is_refused(
    strict: tuple[NodeApp, str], probe: Probe, signed: dict[str, Path], keys: Path
) -> None:
    app, sensor = strict
    other_node = issue(app, signed["1.1.0"], keys).model_copy()  # issued for this node ...
    put(probe, app, other_node, level="group")  # ... published for its whole group
    refusal(probe, app, f"was issued for node {app.node_id}, not for group")
    assert serves(probe, sensor, 4) == "1.0.0"


def test_an_expired_desired_state_is_refused(
    strict: tuple[NodeApp, str], probe: Probe, signed: dict[str, Path], keys: Path
) -> None:
    app, sensor = strict
    key = load_private_key(keys / "fleet.key")
    stale = scoped(desired_for(signed["1.1.0"]), "node", app.node_id, key, expires_in_s=0.01)
    time.sleep(0.05)
    put(probe, app, stale)
    refusal(probe, app, "expired at")
    assert serves(probe, sensor, 5) == "1.0.0"


def test_a_forged_signature_is_refused(
    strict: tuple[NodeApp, str], probe: Probe, signed: dict[str, Path], keys: Path
) -> None:
    app, sensor = strict
    genuine = issue(app, signed["1.1.0"], keys)
    forged = genuine.model_copy(update={"version": "1.2.0", "rollback": True})
    put(probe, app, forged)
    refusal(probe, app, "bad signature")
    assert serves(probe, sensor, 6) == "1.0.0"


def test_the_history_survives_a_restart(
    start_node: NodeFactory, probe: Probe, strict: tuple[NodeApp, str], signed: dict[str, Path],
    keys: Path, broker: LocalBroker,
) -> None:  # fmt: skip
    app, _ = strict
    captured = issue(app, signed["1.1.0"], keys)
    put(probe, app, captured)
    active(probe, app, "1.1.0")
    put(probe, app, issue(app, signed["1.2.0"], keys))
    active(probe, app, "1.2.0")
    app.stop()
    again = start_node(model=signed["1.0.0"], trust_key=keys / "fleet.pub", node_id=app.node_id,
                       group=app.config.group, cache_dir=app.config.cache_dir)  # fmt: skip
    put(probe, again, captured)  # replayed while the node was away
    refusal(probe, again, "a replayed or stale message")


def test_keys_rotate_through_a_folder_of_trusted_keys(
    start_node: NodeFactory, broker: LocalBroker, probe: Probe, signed: dict[str, Path],
    keys: Path, tmp_path: Path,
) -> None:  # fmt: skip
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "fleet-2025.pub").write_bytes((keys / "fleet.pub").read_bytes())
    new = generate_keys(tmp_path / "new")
    (trusted / "fleet-2026.pub").write_bytes(new.public.read_bytes())
    app = start_node(model=signed["1.0.0"], trust_key=trusted, cache_dir=tmp_path / "cache")
    probe.subscribe(topics.node_model(app.node_id), topics.node_errors(app.node_id))
    rotated = sign_bundle(read_bundle(signed["1.1.0"]), new.private, tmp_path / "r.tar")
    assert rotated.path is not None
    publish_bundle(rotated.path, broker.url)
    put(probe, app, issue(app, rotated.path, tmp_path / "new"))  # bundle and order: new key
    assert active(probe, app, "1.1.0")["following"]["key_id"] == new.key_id


def test_retiring_the_old_key_never_leaves_a_node_unable_to_start(
    start_node: NodeFactory, broker: LocalBroker, probe: Probe, signed: dict[str, Path],
    keys: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """The documented rotation, step by step: the new key in the trust folder, a bundle signed
    with it rolled out, the old key removed, the node restarted. Its configured `model` (signed
    with the retired key) is refused; it starts on the bundle it served last, and says why."""
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / "fleet-2025.pub").write_bytes((keys / "fleet.pub").read_bytes())
    new = generate_keys(tmp_path / "new")
    (trusted / "fleet-2026.pub").write_bytes(new.public.read_bytes())  # step 1
    settings = {
        "model": signed["1.0.0"],
        "trust_key": trusted,
        "cache_dir": tmp_path / "cache",
        "state_dir": tmp_path / "state",
    }
    app = start_node(**settings)
    probe.subscribe(topics.node_model(app.node_id))
    rotated = sign_bundle(read_bundle(signed["1.2.0"]), new.private, tmp_path / "r.tar")
    assert rotated.path is not None
    publish_bundle(rotated.path, broker.url)
    put(probe, app, issue(app, rotated.path, tmp_path / "new"))  # step 2
    active(probe, app, "1.2.0")
    app.stop("restart after the rotation")
    (trusted / "fleet-2025.pub").unlink()  # step 3
    again = start_node(**settings, node_id=app.node_id)
    assert again.worker.pipeline.ref.version == "1.2.0"
    assert again.worker.pipeline.bundle.manifest.signature is not None
    assert again.worker.pipeline.bundle.manifest.signature.key_id == new.key_id
    again.stop("done")
    with pytest.raises(SignatureError, match="imu-fleet bundle sign"):  # nothing served before
        start_node(**{**settings, "state_dir": tmp_path / "empty"}, node_id=app.node_id)


# -- fetching cannot hurt the node -----------------------------------------------------------------


def test_file_urls_are_off_by_default_and_dev_zero_cannot_kill_the_manager(
    start_node: NodeFactory, probe: Probe, signed: dict[str, Path], keys: Path,
    broker: LocalBroker, tmp_path: Path,
) -> None:  # fmt: skip
    app = start_node(model=signed["1.0.0"], trust_key=keys / "fleet.pub", file_url_root=None,
                     cache_dir=tmp_path / "cache")  # fmt: skip
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_model(app.node_id),
                    topics.node_errors(app.node_id))  # fmt: skip
    put(probe, app, issue(app, signed["1.1.0"], keys, url="file:///dev/zero"))
    model_failure(probe, app, "file:// sources are off on this node")
    assert app.readiness()["model_manager"]
    publish_bundle(signed["1.2.0"], broker.url)
    put(probe, app, issue(app, signed["1.2.0"], keys))  # a valid order still works
    active(probe, app, "1.2.0")
    assert serves(probe, sensor, 7) == "1.2.0"


def test_file_urls_stay_inside_their_root_and_read_regular_files_only(
    start_node: NodeFactory, probe: Probe, signed: dict[str, Path], keys: Path, tmp_path: Path
) -> None:
    root = tmp_path / "bundles"
    root.mkdir()
    app = start_node(model=signed["1.0.0"], trust_key=keys / "fleet.pub", file_url_root=root,
                     cache_dir=tmp_path / "cache")  # fmt: skip
    probe.subscribe(topics.node_model(app.node_id), topics.node_errors(app.node_id))
    outside = signed["1.1.0"].as_uri()
    put(probe, app, issue(app, signed["1.1.0"], keys, url=outside))
    model_failure(probe, app, "is outside this node's file_url_root")
    sneaky = (root / ".." / signed["1.1.0"].name).as_posix()
    (root / "link.tar").symlink_to("/dev/zero")
    put(probe, app, issue(app, signed["1.1.0"], keys, url=f"file://{root}/link.tar"))
    model_failure(probe, app, "is outside this node's file_url_root")  # the link leaves the root
    put(probe, app, issue(app, signed["1.1.0"], keys, url=f"file://{sneaky}"))
    model_failure(probe, app, "is outside this node's file_url_root")
    inside = root / "ok.tar"
    inside.write_bytes(signed["1.1.0"].read_bytes())
    put(probe, app, issue(app, signed["1.1.0"], keys, url=inside.as_uri()))
    active(probe, app, "1.1.0")


class _Endless(http.server.BaseHTTPRequestHandler):
    """Answers every GET with bytes that never end (or trickle, with ?slow)."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        piece = b"\0" * 65536
        slow = "slow" in self.path
        try:
            while True:
                self.wfile.write(piece[:16] if slow else piece)
                if slow:
                    time.sleep(0.05)
        except OSError:
            return

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def endless_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_source_that_never_ends_is_cut_at_the_signed_size_and_the_deadline(
    start_node: NodeFactory, probe: Probe, signed: dict[str, Path], keys: Path,
    endless_server: str, tmp_path: Path,
) -> None:  # fmt: skip
    app = start_node(model=signed["1.0.0"], trust_key=keys / "fleet.pub", fetch_timeout_s=2,
                     cache_dir=tmp_path / "cache")  # fmt: skip
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_model(app.node_id))
    rss_before = psutil.Process().memory_info().rss
    started = time.monotonic()
    put(probe, app, issue(app, signed["1.1.0"], keys, url=f"{endless_server}/bundle.tar"))
    model_failure(probe, app, "sends more than the")
    put(probe, app, issue(app, signed["1.1.0"], keys, url=f"{endless_server}/bundle.tar?slow"))
    model_failure(probe, app, "did not finish within 2 s")
    took = time.monotonic() - started
    grew_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
    print(f"\nendless and trickling sources refused in {took:.1f} s, RSS +{grew_mb:.0f} MB")
    assert grew_mb < 64  # at most one bundle's worth (the reference is ~100 KB)
    assert serves(probe, sensor, 8) == "1.0.0"


def test_a_chunk_flood_without_a_manifest_is_not_held(
    start_node: NodeFactory, probe: Probe, signed: dict[str, Path], keys: Path
) -> None:
    app = start_node(model=signed["1.0.0"], trust_key=keys / "fleet.pub", fetch_timeout_s=4)
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_model(app.node_id))
    desired = issue(app, signed["1.1.0"], keys).model_copy()
    ghost = scoped(
        desired.model_copy(update={"version": "9.9.9"}), "node", app.node_id,
        load_private_key(keys / "fleet.key"),
    )  # fmt: skip # a version nobody published: its manifest never comes
    rss_before = psutil.Process().memory_info().rss
    put(probe, app, ghost)
    junk = b"\xa5" * 1_000_000
    for index in range(600):  # 600 MB of chunks with no manifest, as the attack report sent
        probe.publish(topics.artifact("tcn-reference", "9.9.9", f"chunks/{index}"), junk, qos=0)
    failed = model_failure(probe, app, "no artifact manifest", timeout=60)
    grew_mb = (psutil.Process().memory_info().rss - rss_before) / 2**20
    print(f"\nchunk flood (600 x 1 MB, no manifest): RSS +{grew_mb:.0f} MB; {failed['last_error']}")
    assert grew_mb < 64
    assert serves(probe, sensor, 9) == "1.0.0"


def test_imu_fleet_nodes_shows_who_pinned_whom_and_the_drift(
    strict: tuple[NodeApp, str], probe: Probe, signed: dict[str, Path], keys: Path,
    broker: LocalBroker,
) -> None:  # fmt: skip
    import subprocess
    import sys

    from helpers.programs import subprocess_env

    app, _ = strict
    put(probe, app, issue(app, signed["1.1.0"], keys))  # a node-level pin
    active(probe, app, "1.1.0")
    put(probe, app, issue(app, signed["1.2.0"], keys, level="group"))  # the group moves on
    time.sleep(0.5)
    done = subprocess.run(
        [sys.executable, "-m", "fleet.cli", "nodes", "--wait", "1", "--broker", broker.url],
        capture_output=True, text=True, timeout=60, env=subprocess_env("onnx"), check=True,
    )  # fmt: skip
    row = next(line for line in done.stdout.splitlines() if line.startswith(app.node_id))
    assert "node: 1.1.0" in row  # the pin is visible, and it is what the node runs
    assert row.rstrip().endswith("-")
    put(probe, app, signed_clear(app, keys))  # unpin: the node follows its group
    state = active(probe, app, "1.2.0")
    assert (state["following"]["scope"], state["following"]["target"]) == (
        "group",
        app.config.group,
    )
    put(probe, app, signed_clear(app, keys, "group"))


def test_an_unsigned_clear_cannot_undo_a_signed_pin(
    strict: tuple[NodeApp, str], probe: Probe, signed: dict[str, Path], keys: Path
) -> None:
    """A rollback pin holds a node back from a bad group version: an empty retained message
    (anyone who can publish there) must not release it."""
    app, sensor = strict
    put(probe, app, issue(app, signed["1.2.0"], keys, level="group"))
    active(probe, app, "1.2.0")
    put(probe, app, issue(app, signed["1.1.0"], keys, rollback=True))
    active(probe, app, "1.1.0")
    put(probe, app, b"")
    refusal(probe, app, "an unsigned clear (empty message) of the node")
    assert serves(probe, sensor, 10) == "1.1.0"
    future = issue(app, signed["1.2.0"], keys).model_copy(update={"signature": None})
    key = load_private_key(keys / "fleet.key")
    ahead = scoped(future, "node", app.node_id, key).model_copy()
    ahead = sign_desired(ahead.model_copy(update={"issued_at": time.time() + 86400}), key)
    put(probe, app, ahead)  # a controller a day ahead would block this scope for a day
    refusal(probe, app, "more than an hour ahead of this node's clock")
    put(probe, app, signed_clear(app, keys, "group"))


def test_a_fifo_inside_the_root_cannot_hold_the_manager(
    start_node: NodeFactory, probe: Probe, signed: dict[str, Path], keys: Path, tmp_path: Path
) -> None:
    import os

    from node.updates.fetch import FetchError, cache_path

    root = tmp_path / "bundles"
    root.mkdir()
    os.mkfifo(root / "pipe.tar")
    app = start_node(model=signed["1.0.0"], trust_key=keys / "fleet.pub", file_url_root=root,
                     cache_dir=tmp_path / "cache")  # fmt: skip
    probe.subscribe(topics.node_model(app.node_id))
    put(probe, app, issue(app, signed["1.1.0"], keys, url=(root / "pipe.tar").as_uri()))
    model_failure(probe, app, "is not a regular file")  # refused at once, not read from
    with pytest.raises(FetchError, match="not a valid name"):
        cache_path(tmp_path, "../../etc", "1.0.0", "0" * 64)


# -- freshness: orders expire, a freeze shows, old captures are refused ----------------------------


def stale_state(probe: Probe, app: NodeApp, *, stale: bool, timeout: float = 30) -> dict:
    """The first model state saying the control plane is stale (or, with `stale` False, fresh
    again after having been stale)."""

    def matches(m: object) -> bool:
        return (m.json().get("stale_since") is not None) == stale  # type: ignore[attr-defined]

    return probe.wait_for(topics.node_model(app.node_id), where=matches, timeout=timeout)[-1].json()


def test_an_order_that_expires_unrenewed_makes_the_node_report_a_stale_control_plane(
    strict: tuple[NodeApp, str], probe: Probe, signed: dict[str, Path], keys: Path
) -> None:
    app, sensor = strict
    key = load_private_key(keys / "fleet.key")
    order = scoped(desired_for(signed["1.1.0"]), "node", app.node_id, key, expires_in_s=4)
    put(probe, app, order)
    active(probe, app, "1.1.0")
    errors = probe.wait_for(
        topics.node_errors(app.node_id), where=lambda m: m.json()["kind"] == "control_plane_stale"
    )
    assert "without a renewal" in errors[0].json()["reason"]
    state = stale_state(probe, app, stale=True)
    assert "expired" in state["stale_reason"]
    assert serves(probe, sensor, 7) == "1.1.0"  # it keeps serving what it has
    probe.messages.clear()  # before the renewal: the fresh state may come at once
    put(probe, app, scoped(desired_for(signed["1.1.0"]), "node", app.node_id, key))  # renewed
    assert "stale_since" not in stale_state(probe, app, stale=False)


def test_a_node_with_no_memory_refuses_a_captured_order_older_than_its_window(
    strict: tuple[NodeApp, str], probe: Probe, signed: dict[str, Path], keys: Path
) -> None:
    """The red team's re-imaged node took a 20-minute-old captured rollback. A node has no
    record of a scope until it took a message there; then only recent ones count."""
    app, sensor = strict
    key = load_private_key(keys / "fleet.key")
    captured = scoped(desired_for(signed["1.1.0"]), "group", app.config.group, key)
    old = captured.issued_at - 20 * 60
    captured = sign_desired(
        captured.model_copy(update={"issued_at": old, "expires_at": old + 3600}), key
    )
    put(probe, app, captured)
    assert "too old to take" in refusal(probe, app, "more than 900 s ago")["reason"]
    assert serves(probe, sensor, 8) == "1.0.0"
    assert "too old" in stale_state(probe, app, stale=True)["stale_reason"]
    put(probe, app, signed_clear(app, keys, "group"))


def test_the_controller_service_renews_current_orders_and_nothing_else(
    broker: LocalBroker, probe: Probe, signed: dict[str, Path], keys: Path, backend: str
) -> None:
    from fleet.rollout.service import ControllerService

    key = load_private_key(keys / "fleet.key")
    group, other, gone = unique("grp"), unique("grp"), unique("grp")
    current = scoped(desired_for(signed["1.1.0"]), "group", group, key)
    older = scoped(desired_for(signed["1.0.0"]), "group", other, key)
    newest = scoped(desired_for(signed["1.2.0"]), "group", other, key)
    unsigned = scoped(desired_for(signed["1.2.0"]), "group", gone, None)
    probe.subscribe(topics.group_desired(group), topics.group_desired(other))
    probe.publish(topics.group_desired(group), encode(current), retain=True)
    probe.publish(topics.group_desired(other), encode(newest), retain=True)
    probe.publish(topics.group_desired(gone), encode(unsigned), retain=True)
    service = ControllerService(broker.url, sign_key=keys / "fleet.key", poll_s=0.2, renew_s=1.0)
    runner = threading.Thread(target=service.run, daemon=True)
    runner.start()
    try:
        assert service.renewer is not None
        wait_until(lambda: service.renewer is not None and service.renewer.renewed >= 2)
        probe.publish(topics.group_desired(other), encode(older), retain=True)  # re-retained
        renewed = probe.wait_for(topics.group_desired(group), 2)[-1].json()
        assert renewed["issued_at"] > current.issued_at
        assert (renewed["version"], renewed["scope"], renewed["target"]) == (
            "1.1.0",
            "group",
            group,
        )
        since = service.renewer.renewed  # renewals after the re-retained 1.0.0 is on the broker
        wait_until(lambda: service.renewer is not None and service.renewer.renewed >= since + 2, 15)
        others = [m.json() for m in probe.on(topics.group_desired(other)) if m.json()]
        assert others[-1]["version"] == "1.2.0"  # the re-retained 1.0.0 was never renewed
    finally:
        service.request_stop()
        runner.join(5)
        service.close()
        for topic in (group, other, gone):
            probe.publish(topics.group_desired(topic), b"", retain=True)
