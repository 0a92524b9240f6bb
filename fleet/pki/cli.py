"""`imu-fleet pki`: the argument parser, its help texts, and `main`."""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Final

from common.cli import some_of
from fleet.pki.bridges import DEFAULT_FILES_DIR, write_bridge_kit
from fleet.pki.certs import LEAF_DAYS
from fleet.pki.errors import PkiError
from fleet.pki.registry import Layout, load_site
from fleet.pki.roles import AUTH_CHOICES, ROLES, username_for
from fleet.pki.site import (
    add_client,
    init_site,
    issue_server_cert,
    remove_client,
    sync_broker_files,
)

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
  bridge     (on a fleet broker, one per site: `bridge`) reads desired state, artifacts and
             rollouts; writes only its own nodes' fleet/nodes/{id}/* and fleet/sites/{site}/link

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

  # on a fleet broker's folder: a site broker's bridge, its ACL block and its files
  imu-fleet pki bridge site/ farm-a --node pi-01 --fleet-host fleet.example.com --out farm-a/

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
    "bridge": (
        "let a site broker bridge to this fleet broker: its login, ACL and configuration",
        "On the fleet broker's SITE_DIR (site/ below), register bridge-SITE with a certificate\n"
        "from the fleet CA and an ACL that lets it write only its own --node topics (status,\n"
        "telemetry, model, errors), its link state and the results of --results-for sensors,\n"
        "and read desired state, artifacts and rollout records. Then write into --out what the\n"
        "site broker\n"
        "needs: bridge-SITE.conf (a mosquitto `connection` block, TLS, topics per direction,\n"
        "link notifications on fleet/sites/SITE/link), fleet-ca.crt and the bridge's\n"
        "certificate and key. Sensor windows never cross. Given again, the nodes and sensors\n"
        "replace the previous ones.\n\n"
        "  imu-fleet pki bridge site/ farm-a --node pi-01 --node pi-02 \\\n"
        "      --fleet-host fleet.example.com --out farm-a-bridge/\n"
        "  # the fleet broker: kill -HUP (new ACL). The site broker: copy farm-a-bridge/ to\n"
        "  # /mosquitto/config/bridge/, append bridge-farm-a.conf to mosquitto.conf, restart.\n"
        "  # many nodes: one id per line in a file\n"
        "  imu-fleet pki bridge site/ farm-b --nodes-file farm-b.nodes \\\n"
        "      --fleet-host fleet.example.com --out farm-b-bridge/",
    ),
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
    _bridge_arguments(commands["bridge"])
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


def _bridge_arguments(bridge: argparse.ArgumentParser) -> None:
    bridge.add_argument("site", metavar="SITE", help="the site's name (its bridge is bridge-SITE)")
    bridge.add_argument(
        "--node", action="append", default=[], metavar="NODE_ID",
        help="a node of the site (repeat): the only nodes the bridge may speak for",
    )  # fmt: skip
    bridge.add_argument(
        "--nodes-file", type=Path, metavar="FILE",
        help="more of the site's nodes, one id per line (blank lines and # comments skipped)",
    )  # fmt: skip
    bridge.add_argument(
        "--results-for", action="append", default=[], metavar="SENSOR_ID",
        help="a sensor whose results go up to the fleet (repeat; default: results stay)",
    )  # fmt: skip
    bridge.add_argument(
        "--fleet-host", required=True, metavar="HOST[:PORT]",
        help="the fleet broker as the site reaches it: one of its certificate's names (port 8883)",
    )  # fmt: skip
    bridge.add_argument("--out", type=Path, required=True, help="folder for the site's files")
    bridge.add_argument(
        "--files-dir", default=DEFAULT_FILES_DIR,
        help="where --out's files will be on the site broker (default %(default)s)",
    )  # fmt: skip


def read_node_ids(path: Path) -> list[str]:
    """Node ids from a file, one per line; blank lines and `#` comments are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"--nodes-file {path}: cannot read it ({exc})"
        raise PkiError(msg) from exc
    return [line for raw in text.splitlines() if (line := raw.split("#", 1)[0].strip())]


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
        if args.role == "bridge":
            msg = "a bridge needs its nodes and a configuration: use `imu-fleet pki bridge`"
            raise PkiError(msg)
        _run_add(args, layout)
    elif args.command == "bridge":
        nodes = [*args.node, *(read_node_ids(args.nodes_file) if args.nodes_file else ())]
        kit = write_bridge_kit(
            root, args.site, args.out, fleet_host=args.fleet_host, nodes=tuple(nodes),
            sensors=tuple(args.results_for), files_dir=args.files_dir,
        )  # fmt: skip
        for path in kit.files:
            _say(f"wrote {path}")
        carried = (
            f" and carry the results of {', '.join(kit.client.sensors)}"
            if kit.client.sensors
            else "; results stay on the site"
        )
        _say(
            f"{kit.client.username} may speak for {some_of(kit.client.nodes)}{carried}",
            f"fleet broker: send it SIGHUP to load the new ACL ({layout.acl_file})",
            f"site broker: copy {args.out}/ to {args.files_dir}/, add {kit.conf.name} to its "
            "mosquitto.conf, restart it",
        )
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
