"""Site PKI and broker credentials for the locked-down broker (compose/mosquitto-secure.conf).

One folder per site (SITE_DIR) holds everything; `imu-fleet pki --help` shows the commands.

    site.json                   the registry: site name, server host names, clients and their roles
    ca/ca.key, ca/ca.crt        the site CA (EC P-256, SHA-256); keep ca.key offline after set-up
    broker/certs/               ca.crt, server.crt, server.key   -> mount as /mosquitto/certs
    broker/config/              passwd, mosquitto.acl            -> mount as /mosquitto/config
    clients/                    ca.crt and, per client, USERNAME.crt/.key/.password

Usernames follow one convention, `{role}-{name}`: `sensor-{sensor_id}`, `node-{node_id}`,
`fleet-{name}` (rollout controller, operators), `dashboard-{name}`. A client certificate carries
the username as its CN (the broker's 8883 listener uses it as the MQTT username); a password
client logs in with the username on 8884 (TLS) or on the broker host's loopback 1883.

mosquitto's `pattern` lines apply to every client and cannot strip the role prefix from `%u`, so
the ACL is generated: one explicit `user` block per client with its role's grants expanded for its
id, and no `pattern` line at all. A client missing from the ACL may do nothing (mosquitto denies
what no line grants), which is also how `remove` revokes a certificate that cannot be recalled.
Regenerate after every change (`add` and `remove` do it) and send the broker SIGHUP to reload it.

Passwords are random (`secrets.token_urlsafe`), kept in 0600 files, and hashed in mosquitto's own
PBKDF2-SHA512 format (`user:$7$iterations$salt_b64$hash_b64`): by `mosquitto_passwd` when it is
installed (the password goes through its stdin, never its command line), else by `hash_password`.
"""

from __future__ import annotations

from fleet.pki.bridges import BridgeKit, render_bridge_conf, write_bridge_kit
from fleet.pki.cli import build_parser, main
from fleet.pki.errors import PkiError
from fleet.pki.passwords import hash_password, hash_with_mosquitto_passwd, verify_password
from fleet.pki.registry import Layout, Site, load_site
from fleet.pki.roles import ROLES, Auth, Client, Grant, Role, render_acl, username_for
from fleet.pki.site import (
    AddResult,
    add_client,
    init_site,
    issue_server_cert,
    remove_client,
    sync_broker_files,
)

__all__ = [
    "ROLES",
    "AddResult",
    "Auth",
    "BridgeKit",
    "Client",
    "Grant",
    "Layout",
    "PkiError",
    "Role",
    "Site",
    "add_client",
    "build_parser",
    "hash_password",
    "hash_with_mosquitto_passwd",
    "init_site",
    "issue_server_cert",
    "load_site",
    "main",
    "remove_client",
    "render_acl",
    "render_bridge_conf",
    "sync_broker_files",
    "username_for",
    "verify_password",
    "write_bridge_kit",
]
