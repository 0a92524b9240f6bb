"""`imu-fleet dashboard`: the live fleet page."""

from __future__ import annotations

import argparse
import sys
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
            metrics_token_file=args.metrics_token_file,
            open=args.open,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            limits=Limits(max_sensors=args.max_sensors),
            max_clients=args.max_pages,
        )
    )


def _link(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415
    import ssl  # noqa: PLC0415
    import urllib.error  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    from common.http import read_token_file  # noqa: PLC0415

    base = args.url.rstrip("/")
    if not base.startswith(("http://", "https://")):
        msg = f"{args.url!r}: give the dashboard's address, e.g. https://fleet.local:8090"
        raise ValueError(msg)
    token = read_token_file(args.token_file, "--token-file")
    request = urllib.request.Request(  # noqa: S310 (http/https checked above)
        f"{base}/login", method="POST", headers={"Authorization": f"Bearer {token}"}, data=b""
    )
    context = ssl.create_default_context(cafile=str(args.ca_file)) if args.ca_file else None
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:  # noqa: S310
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        msg = f"{base} refused: HTTP {exc.code} (is --token-file the dashboard's token?)"
        raise ValueError(msg) from None
    except urllib.error.URLError as exc:
        msg = f"cannot reach {base}: {exc.reason} (is the dashboard running there?)"
        raise ValueError(msg) from None
    print(f"{base}{answer['path']}")
    print(f"(works once, within {answer['expires_in_s']} s)", file=sys.stderr)
    return 0


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
                "--metrics-token-file",
                type=Path,
                help="a separate token for Prometheus: it opens /metrics only, not the page",
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
            "# for the site, read-only login, token and HTTPS; it prints a one-time link to open",
            "head -c 24 /dev/urandom | base64 > dash.token; chmod 600 dash.token",
            "imu-fleet dashboard --broker mqtts://broker.local:8884 --ca-file ca.crt \\\n"
            "      --username dashboard-ops --password-file dashboard-ops.password \\\n"
            "      --listen 0.0.0.0:8090 --token-file dash.token --tls-cert dash.crt "
            "--tls-key dash.key",
            'curl -H "Authorization: Bearer $(cat dash.token)" https://HOST:8090/metrics',
            "imu-fleet dashboard-link https://HOST:8090 --token-file dash.token  # another link",
        ],
    ),
    Command(
        "dashboard-link",
        "a one-time link that opens a session on a dashboard that needs a token",
        _link,
        description="Asks the dashboard (POST /login with the bearer token) for a link that "
        "works once, within five minutes; the session it opens ends on the server after twelve "
        "hours. The token never travels in a URL.",
        args=[
            arg("url", help="the dashboard's address, e.g. https://fleet.local:8090"),
            arg("--token-file", type=Path, required=True, help="the dashboard's token"),
            arg("--ca-file", type=Path, help="the CA of its HTTPS certificate (the site CA)"),
        ],
        examples=[
            "imu-fleet dashboard-link https://fleet.local:8090 --token-file dash.token "
            "--ca-file site/clients/ca.crt"
        ],
    ),
]
"""The dashboard commands of `imu-fleet`."""
