"""The site folder: where each file lives (`Layout`) and its registry, site.json (`Site`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from fleet.pki.errors import PkiError
from fleet.pki.files import Owner, write_atomic, write_if_changed
from fleet.pki.roles import Client

REGISTRY_VERSION: Final = 1


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
                username: {
                    "role": c.role,
                    "name": c.name,
                    "cert": c.cert,
                    "password": c.password,
                    **({"nodes": list(c.nodes)} if c.nodes else {}),
                    **({"sensors": list(c.sensors)} if c.sensors else {}),
                }
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
                nodes=tuple(entry.get("nodes", ())),
                sensors=tuple(entry.get("sensors", ())),
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
