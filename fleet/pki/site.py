"""Operations on a site folder: init, server certificate, add and remove clients, sync.

Every change to the clients rewrites the broker's ACL and password file from site.json; send the
broker SIGHUP to reload them (certificates are read at start-up only).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from fleet.pki.certs import (
    CA_DAYS,
    LEAF_DAYS,
    cert_pem,
    issued_by,
    key_pem,
    load_cert,
    load_key,
    make_ca,
    make_leaf,
)
from fleet.pki.errors import PkiError
from fleet.pki.files import parse_owner, write_atomic
from fleet.pki.passwords import make_password_hash, read_password_file, render_password_file
from fleet.pki.registry import Layout, Site, load_site, save_site
from fleet.pki.roles import ROLES, Auth, Client, render_acl, username_for
from schemas import topics

DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1")


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
    nodes: Sequence[str] = (),
    sensors: Sequence[str] = (),
) -> AddResult:
    """Register `{role}-{name}` and make what it lacks: certificate + key, password, ACL block.

    Idempotent: an existing certificate (signed by the current CA) and password are kept unless
    `renew` / `new_password`; `auth` only ever adds a login method (use `remove` to take one
    away). A bridge (role `bridge`, name = its site) takes the `nodes` it speaks for and the
    `sensors` whose results it carries up; given again, they replace the previous ones. The ACL
    and the password file are rewritten from site.json at the end.
    """
    layout = Layout(root)
    site = load_site(layout)
    username = username_for(role, name)
    _check_scope(role, nodes, sensors)
    wanted = auth or ROLES[role].default_auth
    before = site.clients.get(username)
    client = Client(
        role=role,
        name=name,
        cert=wanted in {"cert", "both"} or (before is not None and before.cert),
        password=wanted in {"password", "both"} or (before is not None and before.password),
        nodes=tuple(dict.fromkeys(nodes)) or (before.nodes if before is not None else ()),
        sensors=tuple(dict.fromkeys(sensors)) or (before.sensors if before is not None else ()),
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


def _check_scope(role: str, nodes: Sequence[str], sensors: Sequence[str]) -> None:
    """Nodes and sensors only for a bridge, each a valid id; a bridge speaks for some node."""
    if role != "bridge" and (nodes or sensors):
        msg = f"--node and --results-for belong to a bridge, not to a {role}"
        raise PkiError(msg)
    for value in (*nodes, *sensors):
        if not topics.is_valid_id(value):
            msg = f"{value!r} is not a node or sensor id (one topic level: letters, digits, _.:-)"
            raise PkiError(msg)


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
