"""Every tool connects through one session, so every refusal reads the same: the broker's (or
TLS's) reason, what it means for this login, and the setting to change; and a refusal retrying
cannot cure stops after a few tries instead of forever. Against the shipped broker
configuration (the secure broker of test_broker_security).

The operator's report: doctor said "no answer in 5 s" on a correct mTLS node and "Not
authorized" with a password file it never read; every tool printed "Protocol error" for a
refused login; a wrong CA retried forever.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_broker_security import SecureBroker, broker  # noqa: F401 (the secure broker fixture)

from common.mqtt.address import BrokerAddress
from common.mqtt.client import ConnectionSettingsError, SessionSettings
from common.mqtt.session import MAX_REFUSALS, MqttSession
from helpers.programs import subprocess_env
from node.config import load_config
from node.errors import ConfigError


def settings(site: SecureBroker, port: str, **login: object) -> SessionSettings:
    return SessionSettings(
        address=BrokerAddress("localhost", site.ports[port], tls=True),
        client_id="refusal-test",
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        **login,  # type: ignore[arg-type]
    )


def refused(session_settings: SessionSettings) -> tuple[str, MqttSession]:
    session = MqttSession(session_settings)
    with pytest.raises(ConnectionError) as caught:
        session.connect(20)
    return str(caught.value), session


def test_a_wrong_password_is_named_with_its_fix_and_not_retried_forever(
    broker: SecureBroker,  # noqa: F811
) -> None:
    ca = str(broker.site.ca_cert)
    message, session = refused(
        settings(broker, "8884", username="dashboard-d1", password="wrong", ca_file=ca)
    )
    assert "Not authorized" in message or "Bad user name or password" in message
    assert "password_file" in message or "imu-fleet pki add" in message
    assert "Protocol error" not in message
    assert session.gave_up.is_set()  # bounded: it stopped by itself
    assert f"refused {MAX_REFUSALS} times in a row" in session.counters.last_error


def test_a_missing_client_certificate_says_so(broker: SecureBroker) -> None:  # noqa: F811
    message, session = refused(settings(broker, "8883", ca_file=str(broker.site.ca_cert)))
    assert "client certificate" in message
    assert "cert_file and key_file" in message
    assert session.gave_up.is_set()


def test_a_wrong_ca_names_ca_file(broker: SecureBroker) -> None:  # noqa: F811
    layout = broker.site
    message, session = refused(
        settings(
            broker,
            "8883",
            ca_file=str(broker.rogue.ca_cert),  # another site's CA
            cert_file=str(layout.client_file("node-n1", "crt")),
            key_file=str(layout.client_file("node-n1", "key")),
        )
    )
    assert "does not verify" in message
    assert "ca_file" in message
    assert session.gave_up.is_set()


def test_a_certificate_and_a_key_that_do_not_match_fail_before_connecting(
    broker: SecureBroker,  # noqa: F811
) -> None:
    layout = broker.site
    with pytest.raises(ConnectionSettingsError, match="do not belong together"):
        MqttSession(
            settings(
                broker,
                "8883",
                ca_file=str(layout.ca_cert),
                cert_file=str(layout.client_file("node-n1", "crt")),
                key_file=str(layout.client_file("node-n2", "key")),
            )
        )


def test_a_node_id_that_differs_from_its_certificate_is_refused_at_start(
    broker: SecureBroker,  # noqa: F811
) -> None:
    with pytest.raises(ConfigError, match="was made for 'node-n1'"):
        load_config(
            broker=f"mqtts://localhost:{broker.ports['8883']}",
            node_id="n9",
            ca_file=broker.site.ca_cert,
            cert_file=broker.site.client_file("node-n1", "crt"),
            key_file=broker.site.client_file("node-n1", "key"),
        )


def doctor(*args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "node.cli", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=subprocess_env("onnx"),
        check=False,
    )
    return done.returncode, done.stdout + done.stderr


def broker_line(report: str) -> str:
    return next(line for line in report.splitlines() if " broker " in f" {line} ")


@pytest.mark.parametrize("login", ["certificate", "password file"])
def test_doctor_passes_on_a_secured_node_and_names_each_broken_credential(
    broker: SecureBroker,  # noqa: F811
    tmp_path: Path,
    login: str,
) -> None:
    layout = broker.site
    if login == "certificate":
        good = (
            f'broker = "mqtts://localhost:{broker.ports["8883"]}"\nnode_id = "n2"\n'
            f'ca_file = "{layout.ca_cert}"\ncert_file = "{layout.client_file("node-n2", "crt")}"\n'
            f'key_file = "{layout.client_file("node-n2", "key")}"\n'
        )
        broken = good.replace(str(layout.ca_cert), str(broker.rogue.ca_cert))
        cause = "ca_file"
    else:
        secret = layout.client_file("dashboard-d1", "password")
        good = (
            f'broker = "mqtts://localhost:{broker.ports["8884"]}"\nnode_id = "n2"\n'
            f'ca_file = "{layout.ca_cert}"\nusername = "dashboard-d1"\n'
            f'password_file = "{secret}"\n'
        )
        wrong = tmp_path / "wrong.password"
        wrong.write_text("not-it\n")
        broken = good.replace(str(secret), str(wrong))
        cause = "password"
    config = tmp_path / "node.toml"
    config.write_text(good)
    _, report = doctor("--config", str(config))
    assert "[ ok ] broker" in broker_line(report), report
    config.write_text(broken)
    status, report = doctor("--config", str(config))
    assert status == 1
    line = report[report.index("[fail] broker") :]
    assert cause in line.split("\n[", 1)[0], report
