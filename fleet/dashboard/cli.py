"""`imu-fleet dashboard`: the live fleet page."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import Command, arg
from fleet.settings import broker_options


def _dashboard(args: argparse.Namespace) -> int:
    from fleet.dashboard.app import DashboardSettings, run  # noqa: PLC0415
    from fleet.dashboard.view import Limits  # noqa: PLC0415

    if args.max_sensors < 1 or args.max_pages < 1:
        msg = "--max-sensors and --max-pages must be at least 1"
        raise ValueError(msg)
    return run(
        DashboardSettings(
            connection=args.broker,
            listen=args.listen,
            token_file=args.token_file,
            open=args.open,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            limits=Limits(max_sensors=args.max_sensors),
            max_clients=args.max_pages,
        )
    )


COMMANDS = [
    Command(
        "dashboard",
        "live web page of the fleet: nodes, rollouts, per-sensor motif ethograms",
        _dashboard,
        description="Subscribes to the broker (the read-only dashboard role is enough) and "
        "serves one page that updates live over server-sent events, plus /metrics for "
        "Prometheus. The browser never talks to the broker. A token is required unless "
        "--listen is loopback or --open is given. See docs/dashboard.md.",
        args=[
            arg(
                "--listen",
                default="127.0.0.1:8090",
                help="HOST:PORT to serve on (127.0.0.1:8090; 0.0.0.0:8090 for the network)",
            ),
            arg(
                "--token-file",
                type=Path,
                help="file holding the token the page, /events and /metrics require",
            ),
            arg(
                "--open",
                action="store_true",
                help="serve beyond loopback without a token: anyone who reaches the port sees "
                "the fleet",
            ),
            arg("--tls-cert", type=Path, help="HTTPS: certificate chain (PEM)"),
            arg("--tls-key", type=Path, help="HTTPS: its private key (PEM)"),
            arg("--max-sensors", type=int, default=500, help="sensors shown at most (500)"),
            arg("--max-pages", type=int, default=32, help="pages connected at once at most (32)"),
        ],
        shared=broker_options,
        examples=[
            "# on this machine only (no token needed on loopback): http://127.0.0.1:8090/",
            "imu-fleet dashboard --broker mqtt://127.0.0.1:1883",
            "# for the site, read-only login, token and HTTPS; open https://HOST:8090/?token=TOKEN "
            "once",
            "head -c 24 /dev/urandom | base64 > dash.token; chmod 600 dash.token",
            "imu-fleet dashboard --broker mqtts://broker.local:8884 --ca-file ca.crt \\\n"
            "      --username dashboard-ops --password-file dashboard-ops.password \\\n"
            "      --listen 0.0.0.0:8090 --token-file dash.token --tls-cert dash.crt "
            "--tls-key dash.key",
            'curl -H "Authorization: Bearer $(cat dash.token)" https://HOST:8090/metrics',
        ],
    )
]
"""The dashboard command of `imu-fleet`."""
