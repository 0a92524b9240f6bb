"""Node configuration (layering, validation, broker URLs, digest) and the hardware node id."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from common.mqtt.address import BrokerAddress
from node.config import NodeConfig, load_config
from node.errors import ConfigError
from node.identity import IdentitySource, default_node_id, hardware_identity
from schemas.topics import is_valid_id


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No IMU_NODE_* variable from the machine running the tests leaks in."""
    for name in list(os.environ):
        if name.upper().startswith("IMU_NODE_"):
            monkeypatch.delenv(name)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


# --- layering -------------------------------------------------------------------------------------


def test_defaults() -> None:
    config = load_config()
    assert config.broker == "mqtt://127.0.0.1:1883"
    assert config.hop == 50
    assert config.group == "default"
    assert config.threads == 1
    assert config.node_id is None
    assert config.password is None
    assert isinstance(config, NodeConfig)


def test_precedence_defaults_toml_env_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = toml(
        tmp_path,
        'hop = 20\ngroup = "from-toml"\nthreads = 3\nbroker = "mqtt://toml-host:1884"\n',
    )
    config = load_config(path)
    assert (config.hop, config.group, config.threads) == (20, "from-toml", 3)
    assert config.broker_address == BrokerAddress("toml-host", 1884, tls=False)
    assert config.max_batch == 8  # untouched settings keep their defaults

    monkeypatch.setenv("IMU_NODE_HOP", "30")
    monkeypatch.setenv("IMU_NODE_THREADS", "4")
    config = load_config(path)
    assert (config.hop, config.group, config.threads) == (30, "from-toml", 4)

    config = load_config(path, hop=40, group=None, threads=None)  # None = flag not given
    assert (config.hop, config.group, config.threads) == (40, "from-toml", 4)


def test_environment_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMU_NODE_BROKER", "mqtts://broker.example:9999")
    monkeypatch.setenv("IMU_NODE_NODE_ID", "node-a1")
    monkeypatch.setenv("IMU_NODE_PASSWORD", "hunter2")
    config = load_config()
    assert config.broker_address == BrokerAddress("broker.example", 9999, tls=True)
    assert config.node_id == "node-a1"
    assert config.password is not None
    assert config.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(config)
    assert load_config(node_id="node-b2").node_id == "node-b2"


def test_unknown_key_in_the_toml_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hopp") as info:
        load_config(toml(tmp_path, "hopp = 20\n"))
    assert "unknown setting" in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"broker": "http://example.com"}, "broker"),
        ({"broker": "mqtt://:1883"}, "broker"),
        ({"broker": "mqtt://host:99999"}, "broker"),
        ({"hop": 0}, "hop"),
        ({"hop": 101}, "hop"),
        ({"node_id": "bad id"}, "node_id"),
        ({"node_id": "a/b"}, "node_id"),
        ({"node_id": "x" * 65}, "node_id"),
        ({"group": "#"}, "group"),
        ({"sensors": "a+b"}, "sensors"),
        ({"threads": 0}, "threads"),
        ({"backend": "tpu"}, "backend"),
    ],
)
def test_invalid_settings_name_the_setting(settings: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(**settings)
    assert re.search(rf"^\s*{setting}: ", str(info.value), re.MULTILINE), str(info.value)


@pytest.mark.parametrize(
    ("text", "setting"),
    [('broker = "ftp://x"\n', "broker"), ("hop = 0\n", "hop"), ('node_id = "no way"\n', "node_id")],
)
def test_invalid_settings_in_the_toml_name_the_setting(
    tmp_path: Path, text: str, setting: str
) -> None:
    with pytest.raises(ConfigError, match=rf"{setting}: "):
        load_config(toml(tmp_path, text))


def test_invalid_environment_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMU_NODE_HOP", "fifty")
    with pytest.raises(ConfigError, match="hop: "):
        load_config()


# --- broker URLs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker.local", BrokerAddress("broker.local", 1883, tls=False)),
        ("mqtts://broker.local", BrokerAddress("broker.local", 8883, tls=True)),
        ("mqtt://10.0.0.5:1884", BrokerAddress("10.0.0.5", 1884, tls=False)),
        ("mqtts://broker.local:443", BrokerAddress("broker.local", 443, tls=True)),
        ("tcp://h:1", BrokerAddress("h", 1, tls=False)),
        ("ssl://h", BrokerAddress("h", 8883, tls=True)),
        ("localhost:1885", BrokerAddress("localhost", 1885, tls=False)),
        ("localhost", BrokerAddress("localhost", 1883, tls=False)),
    ],
)
def test_broker_address_parse(url: str, expected: BrokerAddress) -> None:
    address = BrokerAddress.parse(url)
    assert address == expected
    assert BrokerAddress.parse(str(address)) == address


@pytest.mark.parametrize(
    "url", ["http://h:1883", "mqtt://", "mqtt://:1883", "mqtt://h:99999", "mqtt://h:port"]
)
def test_broker_address_parse_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        BrokerAddress.parse(url)


def test_broker_port_zero_is_rejected() -> None:
    """`parts.port or default` turns an explicit port 0 into 1883 instead of refusing it."""
    with pytest.raises(ValueError, match="port"):
        BrokerAddress.parse("mqtt://broker.local:0")


def test_ipv6_broker_address_prints_as_a_url() -> None:
    """str() drops the brackets: `mqtt://::1:1884`, which parse() itself then refuses."""
    address = BrokerAddress.parse("mqtt://[::1]:1884")
    assert address == BrokerAddress("::1", 1884, tls=False)
    assert str(address) == "mqtt://[::1]:1884"
    assert BrokerAddress.parse(str(address)) == address


# --- digest ---------------------------------------------------------------------------------------


def test_digest_is_stable_and_tracks_settings() -> None:
    base = load_config(node_id="node-1")
    assert re.fullmatch(r"[0-9a-f]{12}", base.digest())
    assert load_config(node_id="node-1").digest() == base.digest()
    assert load_config(node_id="node-1", hop=25).digest() != base.digest()
    assert load_config(node_id="node-2").digest() != base.digest()


def test_digest_excludes_the_password() -> None:
    without = load_config(node_id="node-1").digest()
    assert load_config(node_id="node-1", password="one").digest() == without
    assert load_config(node_id="node-1", password="two").digest() == without


# --- hardware identity ----------------------------------------------------------------------------


def put(root: Path, relative: str, text: str = "") -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def nic(root: Path, name: str, mac: str, *, device: bool = True) -> None:
    put(root, f"sys/class/net/{name}/address", mac + "\n")
    if device:
        (root / f"sys/class/net/{name}/device").mkdir()


CPUINFO = """processor\t: 0
model name\t: ARMv7 Processor rev 3 (v7l)

Hardware\t: BCM2835
Revision\t: c03114
Serial\t\t: 10000000ABCDEF12
Model\t\t: Raspberry Pi 4 Model B Rev 1.4
"""


def everything(root: Path, serial: str = "10000000cafe0001") -> Path:
    put(root, "sys/firmware/devicetree/base/serial-number", serial + "\x00")
    put(root, "proc/cpuinfo", CPUINFO)
    nic(root, "eth0", "dc:a6:32:01:02:03")
    put(root, "etc/machine-id", "0123456789abcdef0123456789abcdef\n")
    return root


def test_device_tree_serial_wins(tmp_path: Path) -> None:
    everything(tmp_path)
    assert hardware_identity(tmp_path) == IdentitySource("board-serial", "10000000cafe0001")


def test_proc_device_tree_serial(tmp_path: Path) -> None:
    put(tmp_path, "proc/device-tree/serial-number", "1a2b3c4d\x00")
    nic(tmp_path, "eth0", "dc:a6:32:01:02:03")
    assert hardware_identity(tmp_path) == IdentitySource("board-serial", "1a2b3c4d")


def test_cpuinfo_serial_is_next(tmp_path: Path) -> None:
    everything(tmp_path, serial="0000000000000000")  # an all-zero serial is no serial
    assert hardware_identity(tmp_path) == IdentitySource("cpu-serial", "10000000abcdef12")


def test_zero_cpuinfo_serial_is_skipped(tmp_path: Path) -> None:
    put(tmp_path, "proc/cpuinfo", CPUINFO.replace("10000000ABCDEF12", "0000000000000000"))
    nic(tmp_path, "eth0", "dc:a6:32:01:02:03")
    assert hardware_identity(tmp_path).kind == "mac"


def test_burned_in_mac_of_a_physical_nic_is_next(tmp_path: Path) -> None:
    nic(tmp_path, "br-1234", "dc:a6:32:00:00:01")
    nic(tmp_path, "docker0", "dc:a6:32:00:00:02")  # virtual by name, even with a device
    nic(tmp_path, "enx0", "02:42:ac:11:00:02")  # locally administered
    nic(tmp_path, "eth0", "dc:a6:32:00:00:03", device=False)  # no backing device
    nic(tmp_path, "eth1", "00:00:00:00:00:00")
    nic(tmp_path, "lo", "00:00:00:00:00:00")
    nic(tmp_path, "veth9a8b7c", "dc:a6:32:00:00:04")
    nic(tmp_path, "wlan0", "B8:27:EB:AA:BB:CC")
    put(tmp_path, "etc/machine-id", "0123456789abcdef0123456789abcdef\n")
    assert hardware_identity(tmp_path) == IdentitySource("mac", "b8:27:eb:aa:bb:cc")


def test_machine_id_is_the_last_resort(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    nic(tmp_path, "docker0", "dc:a6:32:00:00:02")
    nic(tmp_path, "enx0", "02:42:ac:11:00:02")
    put(tmp_path, "etc/machine-id", "0123456789abcdef0123456789abcdef\n")
    assert hardware_identity(tmp_path) == IdentitySource(
        "machine-id", "0123456789abcdef0123456789abcdef"
    )
    assert "machine-id" in caplog.text


def test_node_ids_are_stable_unique_and_valid(tmp_path: Path) -> None:
    first = everything(tmp_path / "a", serial="10000000cafe0001")
    second = everything(tmp_path / "b", serial="10000000cafe0002")
    id_first = default_node_id(first)
    assert default_node_id(first) == id_first
    assert default_node_id(second) != id_first
    for node_id in (id_first, default_node_id(second)):
        assert re.fullmatch(r"node-[0-9a-f]{12}", node_id)
        assert is_valid_id(node_id)
        assert load_config(node_id=node_id).node_id == node_id


def test_same_value_from_different_sources_gives_different_ids(tmp_path: Path) -> None:
    put(tmp_path / "a", "sys/firmware/devicetree/base/serial-number", "abc123\x00")
    put(tmp_path / "b", "etc/machine-id", "abc123\n")
    assert default_node_id(tmp_path / "a") != default_node_id(tmp_path / "b")


def test_no_identity_at_all(tmp_path: Path) -> None:
    nic(tmp_path, "lo", "00:00:00:00:00:00", device=False)
    put(tmp_path, "etc/machine-id", "\n")
    with pytest.raises(RuntimeError, match="node_id"):
        hardware_identity(tmp_path)
    with pytest.raises(RuntimeError):
        default_node_id(tmp_path / "empty")


def test_every_setting_is_documented() -> None:
    """docs/configuration.md carries the generated settings table, current."""
    from node.config import settings_reference

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert settings_reference() in doc + "\n", (
        "docs/configuration.md is stale: paste the output of "
        "`python -c 'from node.config import settings_reference as s; print(s())'`"
    )
