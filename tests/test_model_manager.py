"""Hot swap and refusals: nodes follow desired state through a real mosquitto."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import orjson
import pytest
from test_node_e2e import raw_window

from common.bundle import file_entries, read_bundle, write_bundle
from common.signing import generate_keys, load_private_key
from fleet.bundles.builder import sign_bundle
from fleet.bundles.reference import build_reference_bundle
from fleet.desired import desired_for, desired_topic, scoped
from fleet.distribution import publish_bundle
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.waiting import unique
from node.app import NodeApp
from node.tools.local_broker import LocalBroker
from runtime.reference import build_reference_onnx
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel

ONNX_ONLY = pytest.mark.parametrize("backend", ["onnx"], indirect=True)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Reference-model bundles 1.1.0 and 1.2.0 (other weights, so other latents)."""
    folder = tmp_path_factory.mktemp("versions")
    return {
        v: build_reference_bundle(folder / f"ref-{v}.tar", version=v, seed=seed)
        for v, seed in (("1.1.0", 8), ("1.2.0", 9))
    }


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    generate_keys(folder)
    return folder


def signed_for(app: NodeApp, desired: DesiredModel, keys: Path) -> DesiredModel:
    """`desired` issued now for the node's own topic and signed with the fleet key."""
    return scoped(desired, "node", app.node_id, load_private_key(keys / "fleet.key"))


def set_desired(probe: Probe, app: NodeApp, desired: DesiredModel | None) -> None:
    payload = encode(desired) if desired is not None else b""
    probe.publish(desired_topic("node", app.node_id), payload, retain=True)


def model_states(probe: Probe, app: NodeApp) -> list[dict[str, object]]:
    return [m.json() for m in probe.on(topics.node_model(app.node_id))]


def wait_state(
    probe: Probe, app: NodeApp, state: str, version: str, error: str = "", timeout: float = 30
) -> dict:
    def matches(m: object) -> bool:
        body = m.json()  # type: ignore[attr-defined]
        ref = body["active"] if state == "active" else body["target"]
        found = body["state"] == state and ref is not None and ref["version"] == version
        return found and error in (body["last_error"] or "")

    return probe.wait_for(topics.node_model(app.node_id), where=matches, timeout=timeout)[-1].json()


def serves(probe: Probe, sensor: str, seq: int) -> str:
    """Send one window and return the model version of its result."""
    probe.publish(topics.window(sensor), orjson.dumps({"x": raw_window(seq).tolist(), "seq": seq}))
    found = probe.wait_for(topics.motifs(sensor), where=lambda m: m.json()["seq"] == seq)
    return str(found[0].json()["model"]["version"])


@ONNX_ONLY
def test_hot_swap_under_load_loses_no_window_and_runs_none_twice(
    broker: LocalBroker, start_node: NodeFactory, probe: Probe, versions: dict[str, Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    app = start_node(cache_dir=tmp_path / "cache")
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_model(app.node_id))
    publish_bundle(versions["1.1.0"], broker.url, chunk_size=16 * 1024)
    total = 600
    body = [orjson.dumps({"x": raw_window(i % 20).tolist(), "seq": i}) for i in range(total)]

    def stream() -> None:  # a steady 200 windows/s while the swap happens
        start = time.monotonic()
        for seq in range(total):
            delay = start + seq / 200 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            probe.client.publish(topics.window(sensor), body[seq], qos=1)

    sender = threading.Thread(target=stream)
    sender.start()
    time.sleep(0.5)
    set_desired(probe, app, desired_for(versions["1.1.0"]))
    sender.join()
    results = [m.json() for m in probe.wait_for(topics.motifs(sensor), total, timeout=30)]
    time.sleep(0.3)
    results = [m.json() for m in probe.on(topics.motifs(sensor))]
    assert sorted(r["seq"] for r in results) == list(range(total))  # none lost, none twice
    in_order = sorted(results, key=lambda r: r["seq"])
    served = [r["model"]["version"] for r in in_order]
    switch = served.index("1.1.0")
    assert 0 < switch < total
    assert served == ["1.0.0"] * switch + ["1.1.0"] * (total - switch)  # one clean cut-over
    state = wait_state(probe, app, "active", "1.1.0")
    assert state["previous"]["version"] == "1.0.0"
    steps = [s["state"] for s in model_states(probe, app)]
    assert steps[-4:] == ["downloading", "verifying", "warming", "active"]


def refused(probe: Probe, app: NodeApp, version: str, sensor: str, because: str) -> None:
    """The update was refused for `because`, reported twice over, and the old model serves on."""
    state = wait_state(probe, app, "failed", version, error=because)
    assert state["active"]["version"] == "1.0.0"
    report = probe.wait_for(
        topics.node_errors(app.node_id), where=lambda m: m.json()["kind"] == "model"
    )[-1].json()
    assert because in report["reason"]
    assert serves(probe, sensor, 1) == "1.0.0"


@pytest.fixture
def watched(start_node: NodeFactory, probe: Probe, tmp_path: Path) -> tuple[NodeApp, str]:
    app = start_node(cache_dir=tmp_path / "cache", max_bundle_bytes=2 * 1024 * 1024)
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_model(app.node_id),
                    topics.node_errors(app.node_id))  # fmt: skip
    return app, sensor


@ONNX_ONLY
def test_bad_hash_is_refused(
    broker: LocalBroker, watched: tuple[NodeApp, str], probe: Probe, versions: dict[str, Path]
) -> None:
    app, sensor = watched
    publish_bundle(versions["1.1.0"], broker.url)
    wrong = desired_for(versions["1.1.0"]).model_copy(update={"bundle_sha256": "0" * 64})
    set_desired(probe, app, wrong)
    refused(probe, app, "1.1.0", sensor, "not the bundle the desired state names")


@ONNX_ONLY
def test_corrupt_file_from_url_is_refused(
    watched: tuple[NodeApp, str], probe: Probe, versions: dict[str, Path], tmp_path: Path
) -> None:
    app, sensor = watched
    damaged = tmp_path / "damaged.tar"
    data = bytearray(versions["1.1.0"].read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    desired = desired_for(versions["1.1.0"], url=damaged.as_uri())
    set_desired(probe, app, desired)
    refused(probe, app, "1.1.0", sensor, "do not match the desired state")


@ONNX_ONLY
def test_signature_from_another_key_is_refused(
    start_node: NodeFactory, broker: LocalBroker, probe: Probe, versions: dict[str, Path],
    keys: Path, tmp_path: Path, serving_bundle_path: Path,
) -> None:  # fmt: skip
    signed_base = sign_bundle(read_bundle(serving_bundle_path), keys / "fleet.key",
                              tmp_path / "base.tar")  # fmt: skip
    app = start_node(model=signed_base.path, trust_key=keys / "fleet.pub",
                     cache_dir=tmp_path / "cache")  # fmt: skip
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_model(app.node_id),
                    topics.node_errors(app.node_id))  # fmt: skip
    other = generate_keys(tmp_path / "other")
    foreign = sign_bundle(read_bundle(versions["1.1.0"]), other.private, tmp_path / "f.tar")
    assert foreign.path is not None
    desired = desired_for(foreign.path, url=foreign.path.as_uri())
    set_desired(probe, app, signed_for(app, desired, keys))  # an authentic order, a foreign bundle
    refused(probe, app, "1.1.0", sensor, "not by a trusted key")


@ONNX_ONLY
def test_older_version_needs_a_signed_rollback(
    start_node: NodeFactory, probe: Probe, versions: dict[str, Path], keys: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    newest = sign_bundle(read_bundle(versions["1.2.0"]), keys / "fleet.key", tmp_path / "n.tar")
    older = sign_bundle(read_bundle(versions["1.1.0"]), keys / "fleet.key", tmp_path / "o.tar")
    assert newest.path is not None
    assert older.path is not None
    app = start_node(model=newest.path, trust_key=keys / "fleet.pub", cache_dir=tmp_path / "c")
    sensor = unique("imu")
    probe.subscribe(topics.motifs(sensor), topics.node_model(app.node_id),
                    topics.node_errors(app.node_id))  # fmt: skip
    plain = desired_for(older.path, url=older.path.as_uri())
    set_desired(probe, app, signed_for(app, plain, keys))
    state = wait_state(probe, app, "failed", "1.1.0")
    assert "older than the active 1.2.0" in state["last_error"]
    unsigned_rollback = scoped(plain.model_copy(update={"rollback": True}), "node", app.node_id)
    set_desired(probe, app, unsigned_rollback)
    report = probe.wait_for(
        topics.node_errors(app.node_id), where=lambda m: m.json()["kind"] == "desired_refused"
    )[0].json()
    assert "unsigned desired state" in report["reason"]
    signed = signed_for(app, plain.model_copy(update={"rollback": True}), keys)
    set_desired(probe, app, signed)
    state = wait_state(probe, app, "active", "1.1.0")
    assert state["previous"]["version"] == "1.2.0"
    assert serves(probe, sensor, 2) == "1.1.0"


@ONNX_ONLY
def test_expired_manifest_is_refused(
    watched: tuple[NodeApp, str], probe: Probe, versions: dict[str, Path], tmp_path: Path
) -> None:
    app, sensor = watched
    bundle = read_bundle(versions["1.1.0"])
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).isoformat()
    manifest = bundle.manifest.model_copy(update={"expires_at": past})
    out = tmp_path / "expired.tar"
    write_bundle(out, manifest, bundle.files)
    set_desired(probe, app, desired_for(out, url=out.as_uri()))
    refused(probe, app, "1.1.0", sensor, "expired")


@ONNX_ONLY
def test_oversized_bundle_is_refused(
    watched: tuple[NodeApp, str], probe: Probe, versions: dict[str, Path]
) -> None:
    app, sensor = watched
    huge = desired_for(versions["1.1.0"]).model_copy(update={"bundle_size": 50 * 1024 * 1024})
    set_desired(probe, app, huge)
    refused(probe, app, "1.1.0", sensor, "over this node's")


@ONNX_ONLY
def test_wrong_input_shape_is_refused(
    watched: tuple[NodeApp, str], probe: Probe, versions: dict[str, Path], tmp_path: Path
) -> None:
    app, sensor = watched
    bundle = read_bundle(versions["1.1.0"])
    import onnx

    model = onnx.load_from_string(build_reference_onnx())
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 8  # declares [1, 100, 8]
    files = {**bundle.files, "model.onnx": model.SerializeToString()}
    manifest = bundle.manifest.model_copy(update={"files": file_entries(files)})
    out = tmp_path / "shape.tar"
    write_bundle(out, manifest, files)
    set_desired(probe, app, desired_for(out, url=out.as_uri()))
    refused(probe, app, "1.1.0", sensor, "[batch, 100, 9]")


@ONNX_ONLY
def test_golden_mismatch_is_refused(
    watched: tuple[NodeApp, str], probe: Probe, versions: dict[str, Path], tmp_path: Path
) -> None:
    app, sensor = watched
    other = read_bundle(versions["1.2.0"])
    bundle = read_bundle(versions["1.1.0"])
    files = {**bundle.files, "model.onnx": other.files["model.onnx"]}  # goldens of 1.1.0
    manifest = bundle.manifest.model_copy(update={"files": file_entries(files)})
    out = tmp_path / "golden.tar"
    write_bundle(out, manifest, files)
    set_desired(probe, app, desired_for(out, url=out.as_uri()))
    refused(probe, app, "1.1.0", sensor, "golden check")


@ONNX_ONLY
def test_replayed_desired_state_changes_nothing(
    broker: LocalBroker, watched: tuple[NodeApp, str], probe: Probe, versions: dict[str, Path]
) -> None:
    app, sensor = watched
    publish_bundle(versions["1.1.0"], broker.url)
    desired = desired_for(versions["1.1.0"])
    set_desired(probe, app, desired)
    wait_state(probe, app, "active", "1.1.0")
    before = len(model_states(probe, app))
    set_desired(probe, app, desired)  # seen twice
    app.session._client.reconnect()  # the broker replays the retained desired state
    assert app.session.wait_connected(10)
    time.sleep(1.0)
    after = [s["state"] for s in model_states(probe, app)[before:]]
    assert "downloading" not in after
    assert serves(probe, sensor, 5) == "1.1.0"


@ONNX_ONLY
def test_node_override_wins_over_group(
    broker: LocalBroker, start_node: NodeFactory, probe: Probe, versions: dict[str, Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    group = unique("grp")
    app = start_node(group=group, cache_dir=tmp_path / "c")
    probe.subscribe(topics.node_model(app.node_id))
    for version in ("1.1.0", "1.2.0"):
        publish_bundle(versions[version], broker.url)
    probe.publish(desired_topic("group", group), encode(desired_for(versions["1.1.0"])),
                  retain=True)  # fmt: skip
    wait_state(probe, app, "active", "1.1.0")
    set_desired(probe, app, desired_for(versions["1.2.0"]))
    wait_state(probe, app, "active", "1.2.0")
    probe.publish(desired_topic("group", group), b"", retain=True)


def test_a_damaged_cached_bundle_is_replaced(tmp_path: Path, versions: dict[str, Path]) -> None:
    from common.bundle import sha256_hex
    from node.updates.fetch import add_to_cache, cache_path

    data = versions["1.1.0"].read_bytes()
    target = cache_path(tmp_path, "tcn-reference", "1.1.0", sha256_hex(data))
    target.write_bytes(b"damaged on disk")
    assert add_to_cache(tmp_path, "tcn-reference", "1.1.0", data) == target
    assert target.read_bytes() == data
