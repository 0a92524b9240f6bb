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

import argparse
import base64
import contextlib
import datetime as dt
import grp
import hashlib
import hmac
import ipaddress
import json
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from schemas import topics

Access = Literal["read", "write", "readwrite"]
Auth = Literal["cert", "password", "both"]
AUTH_CHOICES: Final = ("cert", "password", "both")

REGISTRY_VERSION: Final = 1
DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1")
CA_DAYS: Final = 3650
LEAF_DAYS: Final = 825
"""Server and client certificates: a little over two years (renew with `add --renew`)."""

PBKDF2_ITERATIONS: Final = 101
"""mosquitto_passwd 2.0's default. Passwords here are 192 random bits, so stretching adds nothing,
and the broker runs PBKDF2 on every password login."""
PBKDF2_SALT_BYTES: Final = 12  # mosquitto rejects any other salt length
PBKDF2_HASH_BYTES: Final = 64  # SHA-512 output length, the only length mosquitto accepts


class PkiError(Exception):
    """A request the site cannot satisfy (missing CA, bad name, refused overwrite, ...)."""


# ---------------------------------------------------------------------------------------------
# Roles and the ACL
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Grant:
    """One ACL line: `topic ACCESS TOPIC_FILTER`."""

    access: Access
    topic: str


@dataclass(frozen=True, slots=True)
class Role:
    """A kind of client: what it may do, and how it logs in unless told otherwise."""

    name: str
    summary: str
    default_auth: Auth
    grants: Callable[[str], tuple[Grant, ...]]


def sensor_grants(sensor_id: str) -> tuple[Grant, ...]:
    """A sensor publishes its own windows and samples, and reads nothing."""
    return (
        Grant("write", topics.window(sensor_id)),
        Grant("write", topics.samples(sensor_id)),
    )


def node_grants(node_id: str) -> tuple[Grant, ...]:
    """A node reads sensor data and desired state, and writes results and its own reports.

    Shared subscriptions (`$share/GROUP/imu/+/window`) need no line of their own: mosquitto 2.0
    checks read access per delivered message, on the message's topic (`imu/s1/window`).
    """
    return (
        Grant("read", topics.window("+")),
        Grant("read", topics.samples("+")),
        Grant("write", topics.motifs("+")),
        Grant("readwrite", topics.node_status(node_id)),
        Grant("write", topics.node_telemetry(node_id)),
        Grant("write", topics.node_model(node_id)),
        Grant("write", topics.node_errors(node_id)),
        Grant("read", topics.FLEET_DESIRED),
        Grant("read", topics.group_desired("+")),
        Grant("read", topics.node_desired(node_id)),
        Grant("read", topics.artifact("+", "+", "#")),
    )


def fleet_grants(_name: str) -> tuple[Grant, ...]:
    """The fleet role alone writes desired state, artifacts, rollouts and controller presence.

    It reads the whole `fleet/` tree, sensor data (recording) and results, and `$SYS` (the only
    role that does: broker load is for operators, not for dashboards or devices).
    """
    return (
        Grant("write", topics.FLEET_DESIRED),
        Grant("write", topics.group_desired("+")),
        Grant("write", topics.node_desired("+")),
        Grant("write", "fleet/artifacts/#"),
        Grant("write", topics.rollout("#")),
        Grant("write", topics.controller("#")),
        Grant("read", "fleet/#"),
        Grant("read", topics.motifs("+")),
        Grant("read", topics.window("+")),
        Grant("read", topics.samples("+")),
        Grant("read", "$SYS/#"),
    )


def dashboard_grants(_name: str) -> tuple[Grant, ...]:
    """A dashboard reads results, node reports and rollout records; it writes nothing."""
    return (
        Grant("read", topics.motifs("+")),
        Grant("read", topics.node_status("+")),
        Grant("read", topics.node_telemetry("+")),
        Grant("read", topics.node_model("+")),
        Grant("read", topics.node_errors("+")),
        Grant("read", topics.rollout("#")),
    )


ROLES: Final[dict[str, Role]] = {
    role.name: role
    for role in (
        Role("sensor", "publishes imu/{id}/window|samples only", "cert", sensor_grants),
        Role(
            "node",
            "sensor data in, results and its own fleet/nodes/{id}/* out",
            "cert",
            node_grants,
        ),
        Role(
            "fleet",
            "controller/operators: desired state, artifacts, rollouts",
            "cert",
            fleet_grants,
        ),
        Role(
            "dashboard",
            "read-only: results, node reports, rollout records",
            "password",
            dashboard_grants,
        ),
    )
}


@dataclass(frozen=True, slots=True)
class Client:
    """One registered client: `{role}-{name}` with a certificate, a password or both."""

    role: str
    name: str
    cert: bool
    password: bool

    @property
    def username(self) -> str:
        """The MQTT username, which is also the certificate's CN."""
        return username_for(self.role, self.name)

    def grants(self) -> tuple[Grant, ...]:
        """The ACL lines of this client, its role's grants expanded for its name."""
        return ROLES[self.role].grants(self.name)


def username_for(role: str, name: str) -> str:
    """`sensor-imu-17` for role `sensor` and name `imu-17`, after checking both."""
    if role not in ROLES:
        msg = f"unknown role {role!r}; choose one of {', '.join(ROLES)}"
        raise PkiError(msg)
    if not topics.is_valid_id(name):
        msg = (
            f"name {name!r} must be one topic level: letters, digits and _.:- "
            "(at most 64, starting with a letter or digit)"
        )
        raise PkiError(msg)
    return f"{role}-{name}"


def render_acl(site: str, clients: Iterable[Client]) -> str:
    """The mosquitto acl_file for `clients`: a header, then one `user` block per client."""
    ordered = sorted(clients, key=lambda c: (list(ROLES).index(c.role), c.name))
    lines = [
        f"# mosquitto ACL of IMU site {site!r}: generated by `imu-fleet pki`; do not edit.",
        "# Regenerate with `imu-fleet pki acl SITE_DIR`, then send the broker SIGHUP.",
        "#",
        "# One `user` block per client (username = certificate CN = `{role}-{name}`); no",
        "# `pattern` lines, because a pattern applies to every client and cannot strip the role",
        "# prefix from %u. Whatever no line grants is denied; a client without a block (revoked,",
        "# unknown, anonymous) may neither publish nor receive anything. mosquitto 2.0 grants",
        "# every SUBSCRIBE and checks `read` per delivered message, on the message's topic: a",
        "# `$share/GROUP/imu/+/window` subscription is governed by `topic read imu/+/window`.",
        "#",
        "# roles:",
        *(f"#   {role.name:<10} {role.summary}" for role in ROLES.values()),
    ]
    for client in ordered:
        lines += ["", f"# {client.role} {client.name}", f"user {client.username}"]
        lines += [f"topic {grant.access} {grant.topic}" for grant in client.grants()]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Passwords in mosquitto's format
# ---------------------------------------------------------------------------------------------


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """`$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512 as mosquitto 2.0 reads it.

    mosquitto (src/security_default.c, unpwd__decode_passwords) wants type 7, the iteration
    count, a 12-byte salt and a 64-byte hash, both in standard base64 with padding.
    """
    salt = secrets.token_bytes(PBKDF2_SALT_BYTES) if salt is None else salt
    if len(salt) != PBKDF2_SALT_BYTES:
        msg = f"mosquitto needs a {PBKDF2_SALT_BYTES}-byte salt, got {len(salt)}"
        raise PkiError(msg)
    digest = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), salt, iterations, dklen=PBKDF2_HASH_BYTES
    )
    salt64 = base64.b64encode(salt).decode()
    hash64 = base64.b64encode(digest).decode()
    return f"$7${iterations}${salt64}${hash64}"


def verify_password(password: str, hashed: str) -> bool:
    """True when `hashed` (a `$7$...` entry of a password file) is the hash of `password`."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[:2] != ["", "7"]:
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)


def hash_with_mosquitto_passwd(username: str, password: str) -> str | None:
    """The `$7$...` hash `mosquitto_passwd` makes for `password`; None when it is not installed.

    The password goes through stdin (typed twice, as at a terminal), so that it never shows in
    the process list as it would with `mosquitto_passwd -b`.
    """
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory(prefix="imu-pki-") as scratch:
        path = Path(scratch) / "passwd"
        result = subprocess.run(
            [tool, "-c", str(path), username],
            input=f"{password}\n{password}\n",
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        entries = read_password_file(path) if path.exists() else {}
    hashed = entries.get(username)
    if result.returncode != 0 or hashed is None or not verify_password(password, hashed):
        msg = f"mosquitto_passwd failed ({result.returncode}): {result.stderr.strip()}"
        raise PkiError(msg)
    return hashed


def make_password_hash(username: str, password: str, *, use_tool: bool | None = None) -> str:
    """Hash with mosquitto_passwd when installed (or when `use_tool`), else in Python."""
    if use_tool is False:
        return hash_password(password)
    hashed = hash_with_mosquitto_passwd(username, password)
    if hashed is None:
        if use_tool:
            msg = "mosquitto_passwd is not installed"
            raise PkiError(msg)
        return hash_password(password)
    return hashed


def read_password_file(path: Path) -> dict[str, str]:
    """`{username: hash}` from a mosquitto password file (empty when there is none)."""
    if not path.exists():
        return {}
    entries: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#") and ":" in line:
            user, hashed = line.split(":", 1)
            entries[user] = hashed
    return entries


def render_password_file(entries: dict[str, str]) -> str:
    """`{username: hash}` in mosquitto's format (`user:$7$...`, one a line), sorted."""
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))


# ---------------------------------------------------------------------------------------------
# Certificates
# ---------------------------------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    """An EC P-256 key: accepted by every OpenSSL mosquitto, paho and MCU TLS stack in use."""
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, site: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"imu-edge site {site}"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int
) -> x509.CertificateBuilder:
    """Subject, issuer, public key, serial and a validity starting an hour ago (clock skew)."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def make_ca(site: str, days: int = CA_DAYS) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = new_key()
    name = _name(f"imu-edge {site} CA", site)
    cert = (
        _builder(name, name, key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    """An IP address SAN for `10.0.0.5` or `::1`, a DNS name SAN otherwise."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    *,
    server_hosts: Sequence[str] = (),
    days: int = LEAF_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A server certificate (when `server_hosts` are given: SANs, serverAuth) or a client one."""
    key = new_key()
    site = _site_of(ca_cert)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        _builder(_name(common_name, site), ca_cert.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server_hosts:
        sans = [_general_name(host) for host in server_hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _site_of(ca_cert: x509.Certificate) -> str:
    """The site name recorded in the CA's organisation (`imu-edge site NAME`)."""
    orgs = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    value = str(orgs[0].value) if orgs else "imu-edge site ?"
    return value.removeprefix("imu-edge site ")


def issued_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when `ca_cert` signed `cert`."""
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (what mosquitto and paho read without a passphrase)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    """PEM of a certificate."""
    return cert.public_bytes(serialization.Encoding.PEM)


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """An EC private key from PEM."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        msg = f"{path} is not an EC private key"
        raise PkiError(msg)
    return key


def load_cert(path: Path) -> x509.Certificate:
    """A certificate from PEM."""
    return x509.load_pem_x509_certificate(path.read_bytes())


Owner = tuple[int, int]


def write_atomic(path: Path, data: bytes, mode: int, owner: Owner | None = None) -> None:
    """Write `data` to `path` with `mode` (and `owner`) through a temporary file and a rename.

    The file never exists with looser permissions, and a reader (the broker on SIGHUP) sees the
    old or the new content, never half of it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def write_if_changed(path: Path, data: bytes, mode: int, owner: Owner | None = None) -> bool:
    """`write_atomic` unless `path` holds `data` with `mode` and `owner`; True when written."""
    if path.exists() and path.read_bytes() == data:
        stat = path.stat()
        if (stat.st_mode & 0o777) == mode and owner in {None, (stat.st_uid, stat.st_gid)}:
            return False
    write_atomic(path, data, mode, owner)
    return True


def parse_owner(spec: str) -> Owner:
    """`1883:1883`, `mosquitto` or `mosquitto:mosquitto` as (uid, gid)."""
    user, _, group = spec.partition(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        else:
            gid = pwd.getpwuid(uid).pw_gid
    except KeyError as exc:
        msg = f"no such user or group in {spec!r} (give numbers, e.g. 1883:1883)"
        raise PkiError(msg) from exc
    return uid, gid


# ---------------------------------------------------------------------------------------------
# The site folder
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each file of a site lives under SITE_DIR."""

    root: Path

    @property
    def registry(self) -> Path:
        """site.json: site name, server hosts, clients."""
        return self.root / "site.json"

    @property
    def ca_key(self) -> Path:
        """The CA's private key (0600; keep it offline once the site is set up)."""
        return self.root / "ca" / "ca.key"

    @property
    def ca_cert(self) -> Path:
        """The CA certificate every client and the broker trust."""
        return self.root / "ca" / "ca.crt"

    @property
    def broker_certs(self) -> Path:
        """Mounted as /mosquitto/certs: ca.crt, server.crt, server.key."""
        return self.root / "broker" / "certs"

    @property
    def broker_config(self) -> Path:
        """Mounted as /mosquitto/config: passwd, mosquitto.acl (and mosquitto.conf)."""
        return self.root / "broker" / "config"

    @property
    def password_file(self) -> Path:
        """The broker's password_file."""
        return self.broker_config / "passwd"

    @property
    def acl_file(self) -> Path:
        """The broker's acl_file."""
        return self.broker_config / "mosquitto.acl"

    @property
    def clients(self) -> Path:
        """Per-client credentials, and a copy of ca.crt to hand out with them."""
        return self.root / "clients"

    def client_file(self, username: str, suffix: str) -> Path:
        """`clients/USERNAME.crt|.key|.password`."""
        return self.clients / f"{username}.{suffix}"


@dataclass(slots=True)
class Site:
    """The registry (site.json): what `acl` and the password file are rebuilt from."""

    name: str
    hosts: list[str]
    clients: dict[str, Client] = field(default_factory=dict)
    broker_owner: Owner | None = None
    """Owner given to the broker's files (mosquitto reads them after dropping root)."""

    def write_broker_file(self, path: Path, data: bytes, mode: int) -> bool:
        """Write one of the broker's files, owned by `broker_owner`; True when it changed."""
        try:
            return write_if_changed(path, data, mode, self.broker_owner)
        except PermissionError as exc:
            msg = f"cannot give {path} to uid:gid {self.broker_owner}: run as root ({exc})"
            raise PkiError(msg) from exc

    def to_json(self) -> str:
        """site.json content."""
        data = {
            "version": REGISTRY_VERSION,
            "site": self.name,
            "hosts": self.hosts,
            "broker_owner": list(self.broker_owner) if self.broker_owner else None,
            "clients": {
                username: {"role": c.role, "name": c.name, "cert": c.cert, "password": c.password}
                for username, c in sorted(self.clients.items())
            },
        }
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Site:
        """Parse site.json."""
        data = json.loads(text)
        if data.get("version") != REGISTRY_VERSION:
            msg = f"site.json version {data.get('version')!r}, expected {REGISTRY_VERSION}"
            raise PkiError(msg)
        clients = {
            username: Client(
                role=entry["role"],
                name=entry["name"],
                cert=bool(entry["cert"]),
                password=bool(entry["password"]),
            )
            for username, entry in data["clients"].items()
        }
        owner = data.get("broker_owner")
        return cls(
            name=data["site"],
            hosts=list(data["hosts"]),
            clients=clients,
            broker_owner=(int(owner[0]), int(owner[1])) if owner else None,
        )


def load_site(layout: Layout) -> Site:
    """The site's registry; PkiError when SITE_DIR was never initialised."""
    if not layout.registry.exists():
        msg = f"{layout.root} is not a site folder (no site.json); run `init {layout.root}` first"
        raise PkiError(msg)
    return Site.from_json(layout.registry.read_text())


def save_site(layout: Layout, site: Site) -> None:
    """Write site.json (0600: it is not secret, but the folder is private)."""
    write_atomic(layout.registry, site.to_json().encode(), 0o600)


def init_site(
    root: Path,
    *,
    site: str | None = None,
    hosts: Sequence[str] | None = None,
    broker_owner: str | None = None,
    force: bool = False,
    days: int = CA_DAYS,
) -> Site:
    """Create the CA, the server certificate, an empty password file and ACL under `root`.

    `hosts` default to those of a previous init, else localhost and 127.0.0.1. `broker_owner`
    (`1883:1883` in the eclipse-mosquitto image, `mosquitto` on Debian) owns the broker's files:
    mosquitto reads them after dropping root, and later 2.0 releases warn about any other owner
    (kept from a previous init when not given; needs root). Refuses to
    replace an existing CA without `force`: every certificate it issued would stop working. With
    `force`, re-run `add` for each client (it re-issues certificates the new CA did not sign).
    """
    layout = Layout(root)
    if layout.ca_key.exists() and not force:
        msg = (
            f"{layout.ca_key} exists: replacing the CA invalidates every certificate it issued; "
            "pass --force to do it anyway, or use `server` to re-issue the server certificate"
        )
        raise PkiError(msg)
    previous = load_site(layout) if layout.registry.exists() else None
    state = Site(
        name=site or (previous.name if previous else root.resolve().name),
        hosts=list(hosts or (previous.hosts if previous else DEFAULT_HOSTS)),
        clients=previous.clients if previous else {},
        broker_owner=parse_owner(broker_owner) if broker_owner else None,
    )
    if previous is not None and broker_owner is None:
        state.broker_owner = previous.broker_owner
    for folder in (layout.ca_key.parent, layout.clients, layout.broker_certs):
        folder.mkdir(parents=True, exist_ok=True)
    layout.ca_key.parent.chmod(0o700)
    layout.clients.chmod(0o700)
    key, cert = make_ca(state.name, days)
    write_atomic(layout.ca_key, key_pem(key), 0o600)
    write_atomic(layout.ca_cert, cert_pem(cert), 0o644)
    write_atomic(layout.clients / "ca.crt", cert_pem(cert), 0o644)
    state.write_broker_file(layout.broker_certs / "ca.crt", cert_pem(cert), 0o644)
    save_site(layout, state)
    issue_server_cert(root, state.hosts)
    sync_broker_files(root)
    return state


def issue_server_cert(root: Path, hosts: Sequence[str] | None = None) -> list[str]:
    """(Re-)issue the broker's certificate for `hosts` (default: the hosts in site.json).

    The first host is the CN; every host is a SAN (IP addresses as IP SANs). The broker reads
    certificates at start-up only: restart it afterwards.
    """
    layout = Layout(root)
    site = load_site(layout)
    hosts = list(hosts) if hosts else site.hosts
    if not hosts:
        msg = "give the broker's host names and addresses with --host"
        raise PkiError(msg)
    ca_key, ca_cert = load_key(layout.ca_key), load_cert(layout.ca_cert)
    key, cert = make_leaf(ca_key, ca_cert, hosts[0], server_hosts=hosts, days=LEAF_DAYS)
    site.write_broker_file(layout.broker_certs / "server.key", key_pem(key), 0o600)
    site.write_broker_file(layout.broker_certs / "server.crt", cert_pem(cert), 0o644)
    site.hosts = hosts
    save_site(layout, site)
    return hosts


@dataclass(frozen=True, slots=True)
class AddResult:
    """What `add_client` did: the client, files written, and the password when one is new."""

    client: Client
    written: tuple[Path, ...]
    new_password: str | None


def add_client(
    root: Path,
    role: str,
    name: str,
    *,
    auth: Auth | None = None,
    renew: bool = False,
    new_password: bool = False,
    days: int = LEAF_DAYS,
    use_tool: bool | None = None,
) -> AddResult:
    """Register `{role}-{name}` and make what it lacks: certificate + key, password, ACL block.

    Idempotent: an existing certificate (signed by the current CA) and password are kept unless
    `renew` / `new_password`; `auth` only ever adds a login method (use `remove` to take one
    away). The ACL and the password file are rewritten from site.json at the end.
    """
    layout = Layout(root)
    site = load_site(layout)
    username = username_for(role, name)
    wanted = auth or ROLES[role].default_auth
    before = site.clients.get(username)
    client = Client(
        role=role,
        name=name,
        cert=wanted in {"cert", "both"} or (before is not None and before.cert),
        password=wanted in {"password", "both"} or (before is not None and before.password),
    )
    if client.password and ":" in username:
        msg = f"{username!r} contains ':', which a mosquitto password file cannot hold; use cert"
        raise PkiError(msg)
    written: list[Path] = []
    if client.cert:
        written += _ensure_client_cert(layout, username, renew=renew, days=days)
    password: str | None = None
    if client.password:
        password = _ensure_password(layout, username, renew=new_password)
        if password is not None:
            written.append(layout.client_file(username, "password"))
    site.clients[username] = client
    save_site(layout, site)
    written += sync_broker_files(
        root, new_passwords={username: password} if password else None, use_tool=use_tool
    )
    return AddResult(client=client, written=tuple(written), new_password=password)


def _ensure_client_cert(layout: Layout, username: str, *, renew: bool, days: int) -> list[Path]:
    """Issue a certificate + key when missing, not from the current CA, or on `renew`."""
    cert_path = layout.client_file(username, "crt")
    key_path = layout.client_file(username, "key")
    ca_cert = load_cert(layout.ca_cert)
    current = cert_path.exists() and key_path.exists() and issued_by(load_cert(cert_path), ca_cert)
    if current and not renew:
        return []
    key, cert = make_leaf(load_key(layout.ca_key), ca_cert, username, days=days)
    write_atomic(key_path, key_pem(key), 0o600)
    write_atomic(cert_path, cert_pem(cert), 0o644)
    return [cert_path, key_path]


def _ensure_password(layout: Layout, username: str, *, renew: bool) -> str | None:
    """The new password when one was generated (file missing or `renew`), else None."""
    path = layout.client_file(username, "password")
    if path.exists() and not renew:
        return None
    password = secrets.token_urlsafe(24)
    write_atomic(path, (password + "\n").encode(), 0o600)
    return password


def remove_client(root: Path, username: str) -> Client:
    """Drop a client from site.json, the password file and the ACL (its files are deleted).

    A removed certificate still passes the TLS handshake (there is no CRL), but the ACL grants
    its CN nothing: it can neither publish nor receive. Send the broker SIGHUP to apply.
    """
    layout = Layout(root)
    site = load_site(layout)
    client = site.clients.pop(username, None)
    if client is None:
        msg = f"no client {username!r} in {layout.registry}"
        raise PkiError(msg)
    save_site(layout, site)
    for suffix in ("crt", "key", "password"):
        layout.client_file(username, suffix).unlink(missing_ok=True)
    sync_broker_files(root)
    return client


def sync_broker_files(
    root: Path, *, new_passwords: dict[str, str] | None = None, use_tool: bool | None = None
) -> list[Path]:
    """Rewrite the ACL and the password file from site.json; the paths that changed.

    The password file keeps the hashes of registered password clients, hashes `new_passwords`
    and any password client whose hash is missing (from its clients/USERNAME.password), and
    drops everyone else.
    """
    layout = Layout(root)
    site = load_site(layout)
    old = read_password_file(layout.password_file)
    entries: dict[str, str] = {}
    for username, client in site.clients.items():
        if not client.password:
            continue
        fresh = (new_passwords or {}).get(username)
        if fresh is None and username in old:
            entries[username] = old[username]
            continue
        secret_file = layout.client_file(username, "password")
        secret = fresh or (secret_file.read_text().strip() if secret_file.exists() else None)
        if secret is None:
            msg = f"{username} has no password file; run `add` with --new-password"
            raise PkiError(msg)
        entries[username] = make_password_hash(username, secret, use_tool=use_tool)
    # both 0600: later mosquitto 2.0 releases warn about world-readable ACL and password files
    files = {
        layout.password_file: render_password_file(entries),
        layout.acl_file: render_acl(site.name, site.clients.values()),
    }
    return [
        path for path, text in files.items() if site.write_broker_file(path, text.encode(), 0o600)
    ]


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

DESCRIPTION = """\
Certificates, passwords and the ACL of a locked-down site broker (compose/mosquitto-secure.conf).

Usernames are `{role}-{name}`: sensor-{sensor_id}, node-{node_id}, fleet-{name}, dashboard-{name}.
Roles (the ACL grants nothing else):
  sensor     publishes imu/{id}/window and imu/{id}/samples; reads nothing
  node       reads imu/+/window|samples, desired state, artifacts; writes imu/+/motifs and its own
             fleet/nodes/{id}/status|telemetry|model|errors
  fleet      writes desired state, artifacts, rollouts, controller presence; reads fleet/#,
             imu/+/window|samples|motifs and $SYS/#
  dashboard  reads imu/+/motifs, fleet/nodes/+/status|telemetry|model|errors, fleet/rollouts/#

Logins: machines (sensor, node, fleet) get a certificate whose CN is the username, used on the
8883 listener (client certificate required). Dashboards get a password, used on 8884 (TLS) or on
the broker host's 127.0.0.1:1883. `--auth both` gives a client both.
"""

EPILOG = """\
examples:
  # a site: CA, server certificate for the names clients use to reach the broker
  imu-fleet pki init site/ --site line-3 --host broker.local --host 10.0.0.5
  # (as root, add --broker-owner 1883:1883: the container's mosquitto user must own its files)

  # clients (each call rewrites site/broker/config/passwd and mosquitto.acl)
  imu-fleet pki add site/ node pi-0042
  imu-fleet pki add site/ sensor imu-17
  imu-fleet pki add site/ fleet controller
  imu-fleet pki add site/ fleet alice --auth both    # an operator: certificate and password
  imu-fleet pki add site/ dashboard grafana          # password in clients/*.password
  imu-fleet pki list site/
  imu-fleet pki remove site/ dashboard grafana       # revoked: no rights left

  # the broker re-reads passwd and the ACL on SIGHUP (certificates only on restart)
  docker compose -f compose/docker-compose.yml kill -s HUP mosquitto

  # connect: a machine with its certificate, a person with a password
  mosquitto_sub -h broker.local -p 8883 --cafile site/clients/ca.crt \\
      --cert site/clients/node-pi-0042.crt --key site/clients/node-pi-0042.key \\
      -t 'fleet/models/desired'
  mosquitto_sub -h broker.local -p 8884 --cafile site/clients/ca.crt -u dashboard-grafana \\
      -P "$(cat site/clients/dashboard-grafana.password)" -t 'imu/+/motifs'

files: site/ca/ca.key is the site's root of trust (0600; keep it offline once clients are made);
site/broker/certs -> /mosquitto/certs and site/broker/config -> /mosquitto/config in the container;
hand a client site/clients/ca.crt and its own USERNAME.crt/.key (or .password), nothing else.
"""


SUBCOMMANDS: Final[dict[str, tuple[str, str]]] = {
    "init": (
        "create the site CA and the broker's server certificate",
        "Create SITE_DIR with the CA (EC P-256), the broker's server certificate (CN = first\n"
        "--host, every --host a SAN), an empty password file and ACL. Refuses to replace an\n"
        "existing CA without --force: every certificate it issued would stop working (after\n"
        "--force, re-run `add` for each client: it re-issues certificates).\n\n"
        "  sudo imu-fleet pki init site/ --site line-3 --host broker.local \\\n"
        "      --host 10.0.0.5 --broker-owner 1883:1883",
    ),
    "server": (
        "re-issue the broker's server certificate (new host names, renewal)",
        "Issue a new server certificate from the site CA, for --host names (default: the hosts\n"
        "in site.json). mosquitto loads certificates at start-up: restart it afterwards.\n\n"
        "  imu-fleet pki server site/ --host broker.local --host broker.lan --host 10.0.0.5",
    ),
    "add": (
        "add a client (certificate and/or password) and its ACL block",
        "Register ROLE-NAME and make what it lacks: certificate + key (CN = ROLE-NAME) in\n"
        "clients/, a random password in clients/ROLE-NAME.password (0600), its ACL block.\n"
        "Idempotent: existing credentials are kept unless --renew / --new-password; --auth\n"
        "only adds a login method. Rewrites broker/config/passwd and mosquitto.acl.\n\n"
        "  imu-fleet pki add site/ node pi-0042\n"
        "  imu-fleet pki add site/ fleet alice --auth both\n"
        "  imu-fleet pki add site/ dashboard grafana --show-password",
    ),
    "remove": (
        "revoke a client: out of the ACL and the password file",
        "Delete the client's files and drop it from site.json, the password file and the ACL.\n"
        "Its certificate still completes a TLS handshake (no CRL), but the ACL grants its CN\n"
        "nothing. Send the broker SIGHUP to apply.\n\n"
        "  imu-fleet pki remove site/ sensor imu-17",
    ),
    "acl": (
        "rewrite the ACL and the password file from site.json",
        "Regenerate broker/config/mosquitto.acl and passwd from site.json (after editing it,\n"
        "or after upgrading this tool's roles).\n\n  imu-fleet pki acl site/",
    ),
    "list": ("list the clients, their roles and logins", "  imu-fleet pki list site/"),
}


def build_parser() -> argparse.ArgumentParser:
    """The `imu-fleet pki` argument parser."""
    parser = argparse.ArgumentParser(
        prog="imu-fleet pki",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, argparse.ArgumentParser] = {}
    for name, (summary, details) in SUBCOMMANDS.items():
        commands[name] = sub.add_parser(
            name,
            help=summary,
            description=f"{summary[0].upper()}{summary[1:]}.\n\n{details}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        commands[name].add_argument("site_dir", type=Path, metavar="SITE_DIR")
    init, server, add = commands["init"], commands["server"], commands["add"]
    init.add_argument("--site", help="site name (default: the folder's name)")
    for command in (init, server):
        command.add_argument(
            "--host",
            action="append",
            metavar="NAME_OR_IP",
            help="a DNS name or IP address clients use to reach the broker (repeat); default: "
            + ("localhost and 127.0.0.1" if command is init else "the hosts in site.json"),
        )
    init.add_argument(
        "--broker-owner",
        metavar="UID:GID",
        help="owner of the broker's files (1883:1883 in the eclipse-mosquitto image, mosquitto "
        "on Debian); mosquitto reads them after dropping root. Needs root",
    )
    init.add_argument("--force", action="store_true", help="replace an existing CA")
    for command in (add, commands["remove"]):
        command.add_argument("role", choices=list(ROLES), metavar="ROLE", help=", ".join(ROLES))
        command.add_argument("name", metavar="NAME", help="sensor id, node id, or a short name")
    add.add_argument(
        "--auth",
        choices=AUTH_CHOICES,
        help="login method (default: cert for sensor, node, fleet; password for dashboard)",
    )
    add.add_argument("--renew", action="store_true", help="issue a new key and certificate")
    add.add_argument("--new-password", action="store_true", help="generate a new password")
    add.add_argument("--days", type=int, default=LEAF_DAYS, help="certificate lifetime in days")
    add.add_argument(
        "--show-password",
        action="store_true",
        help="print a newly generated password (it is always in the .password file)",
    )
    return parser


def _say(*lines: str) -> None:
    """CLI output on stdout."""
    sys.stdout.write("".join(f"{line}\n" for line in lines))


def _run(args: argparse.Namespace) -> None:
    """Dispatch one parsed command."""
    root: Path = args.site_dir
    layout = Layout(root)
    if args.command == "init":
        site = init_site(
            root, site=args.site, hosts=args.host, broker_owner=args.broker_owner, force=args.force
        )
        _say(
            f"site {site.name!r}: CA {layout.ca_cert}",
            f"server certificate for {', '.join(site.hosts)} in {layout.broker_certs}",
            f"broker files: {layout.password_file}, {layout.acl_file}",
            f"next: imu-fleet pki add {root} node NODE_ID",
        )
    elif args.command == "server":
        hosts = issue_server_cert(root, args.host)
        _say(f"server certificate for {', '.join(hosts)}; restart the broker to load it")
    elif args.command == "add":
        _run_add(args, layout)
    elif args.command == "remove":
        client = remove_client(root, username_for(args.role, args.name))
        _say(f"removed {client.username}; send the broker SIGHUP to apply")
    elif args.command == "acl":
        for path in sync_broker_files(root):
            _say(f"wrote {path}")
    elif args.command == "list":
        site = load_site(layout)
        _say(f"site {site.name!r}, broker hosts: {', '.join(site.hosts)}")
        for client in sorted(site.clients.values(), key=lambda c: (c.role, c.name)):
            logins = [m for m, on in (("cert", client.cert), ("password", client.password)) if on]
            _say(f"  {client.username:<40} {client.role:<10} {'+'.join(logins)}")


def _run_add(args: argparse.Namespace, layout: Layout) -> None:
    """`add`: make the client, then say where its credentials are and how to connect."""
    result = add_client(
        layout.root,
        args.role,
        args.name,
        auth=args.auth,
        renew=args.renew,
        new_password=args.new_password,
        days=args.days,
    )
    client = result.client
    for path in result.written:
        _say(f"wrote {path}")
    if not result.written:
        _say(f"{client.username} is up to date")
    broker_files = {layout.password_file, layout.acl_file}
    ca = layout.clients / "ca.crt"
    if client.cert:
        cert, key = (
            layout.client_file(client.username, "crt"),
            layout.client_file(client.username, "key"),
        )
        _say(f"certificate login (port 8883): --cafile {ca} --cert {cert} --key {key}")
    if client.password:
        secret = layout.client_file(client.username, "password")
        _say(
            f"password login (port 8884, TLS): --cafile {ca} -u {client.username} "
            f'-P "$(cat {secret})"'
        )
        if args.show_password and result.new_password:
            _say(f"password: {result.new_password}")
    if broker_files & set(result.written):
        _say("send the broker SIGHUP to load the new ACL and password file")


def main(argv: list[str] | None = None) -> int:
    """`imu-fleet pki`: returns 0 on success, 1 on a refused request, 2 on bad usage."""
    args = build_parser().parse_args(argv)
    try:
        _run(args)
    except (PkiError, OSError, subprocess.SubprocessError) as exc:
        sys.stderr.write(textwrap.fill(f"error: {exc}", width=100) + "\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
