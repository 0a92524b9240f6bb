"""Log in as a client `imu-fleet pki` made: its certificate and key from the site's `clients/`.

Tools that act for a machine (simulated sensors and nodes, `nodes forget` clearing what only a
node may write) log in with that machine's own certificate, so the broker's ACL applies to them
as to the machine itself.
"""

from __future__ import annotations

from pathlib import Path

from common.mqtt.address import BrokerAddress
from common.mqtt.connection import Connection, Credentials


def client_login(
    connection: Connection, username: str, folder: Path, broker: str | None = None
) -> Connection:
    """`username` (e.g. `node-pi-0042`) with `folder`/USERNAME.crt and .key, on `broker`
    (default: the connection's own), trusting the connection's CA or `folder`/ca.crt.
    FileNotFoundError, naming the command that makes them, when the files are missing."""
    cert, key = folder / f"{username}.crt", folder / f"{username}.key"
    if not cert.is_file() or not key.is_file():
        role, _, name = username.partition("-")
        msg = (
            f"no {cert} or {key}: make them with `imu-fleet pki add site/ {role} {name}` (or "
            "point at the folder it wrote them to, site/clients)"
        )
        raise FileNotFoundError(msg)
    ca = connection.credentials.ca_file or str(folder / "ca.crt")
    address = BrokerAddress.parse(broker) if broker else connection.address
    login = Credentials(ca_file=ca, cert_file=str(cert), key_file=str(key))
    return Connection(address, connection.protocol, login)
