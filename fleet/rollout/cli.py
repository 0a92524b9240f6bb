"""`imu-fleet publish|rollout|status|nodes|unpin|controller|pause|resume|abort|rollback`."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import Arg, Command, Handler, arg
from fleet.settings import broker_options


def _lazy(name: str) -> Handler:
    """The command `name` of fleet/rollout/commands.py, imported when it runs."""

    def run(args: argparse.Namespace) -> int:
        from fleet.rollout import commands  # noqa: PLC0415 (the controller and its session)

        handler: Handler = getattr(commands, name)
        return handler(args)

    return run


def _sign_key(what: str = "signs desired states") -> Arg:
    return arg(
        "--sign-key",
        type=Path,
        help=f"fleet private key: {what} (required when nodes have a trust key)",
    )


def _trust_key() -> Arg:
    return arg(
        "--trust-key",
        type=Path,
        help="more fleet public keys whose signatures to take (a *.pub file or a folder of them, "
        "during a key rotation); the --sign-key's own is always taken",
    )


GATES = "health gates (per wave, after its nodes are active)"

ROLLOUT = Command(
    "rollout",
    "roll a published version out in waves, health-gated; rolls back past the budget",
    _lazy("cmd_rollout"),
    description="Moves nodes by setting their node-level desired state: a canary wave, then "
    "waves reaching each cumulative percentage. A wave's nodes must report the new version "
    "active within --wave-timeout, then the wave soaks (--soak) and each moved node's telemetry "
    "is judged against its own before the move and the nodes not moved yet: error rate, p95 "
    "latency, results per window in, restarts and going offline. More than --max-failures "
    "failed nodes stop the rollout and restore each moved node's previous model; the record "
    "names those that did not confirm it. On success the group (or fleet-wide) desired state "
    "names the new version. The record is retained on fleet/rollouts/ID; a running `imu-fleet "
    "controller` (or `imu-fleet resume ID`) continues one whose controller died.",
    args=[
        arg("name"),
        arg("version"),
        arg("--group", help="only nodes of this group (default: every node)"),
        arg("--canary", type=int, default=1, help="nodes in the first wave (1)"),
        arg("--waves", default="10,50,100", help="cumulative percentages of nodes per wave"),
        arg("--max-failures", type=int, default=0, help="failed nodes tolerated"),
        arg("--wave-timeout", type=float, default=120.0, help="seconds per wave"),
        arg(
            "--by-site",
            action="store_true",
            help="wave by the sites nodes name: --canary nodes in the first site, the rest of "
            "that site, then each other site in turn (instead of --waves)",
        ),
        arg(
            "--site-hold",
            type=float,
            help="seconds past the wave timeout a node behind a down site link is held, neither "
            "failed nor done (600)",
        ),
        arg(
            "--soak",
            type=float,
            group=GATES,
            help="seconds each wave soaks (default: 3 telemetry intervals of its nodes, 30 s at "
            "the default 10 s); at least one interval, or the rollout is refused: only reports "
            "that begin inside the soak count",
        ),
        arg(
            "--max-error-rate",
            type=float,
            default=0.02,
            group=GATES,
            help="node-side errors per window allowed above the reference (0.02)",
        ),
        arg(
            "--max-p95-ratio",
            type=float,
            default=1.5,
            group=GATES,
            help="p95 allowed, as a multiple of the reference (1.5)",
        ),
        arg(
            "--p95-floor-ms",
            type=float,
            default=10.0,
            group=GATES,
            help="a p95 under this always passes (10 ms)",
        ),
        arg(
            "--min-results-ratio",
            type=float,
            default=0.95,
            group=GATES,
            help="results per window in, as a share of the node's own before (0.95)",
        ),
        arg(
            "--no-gates",
            action="store_true",
            group=GATES,
            help="pass a wave as soon as its nodes are active (no soak, no health)",
        ),
        arg(
            "--clear-pins",
            action="store_true",
            help="clear node-level desired states of nodes left out of the rollout first "
            "(without it, they are listed: they would stay on their pinned version)",
        ),
        arg(
            "--detach",
            action="store_true",
            help="plan and leave it to a running `imu-fleet controller`",
        ),
        _sign_key(),
        _trust_key(),
    ],
    shared=broker_options,
    examples=[
        "imu-fleet rollout tcn-vae 1.4.0 --group line-3 --canary 1 --waves 25,50,100 \\\n"
        "      --max-failures 1 --sign-key keys/fleet.key",
        "imu-fleet rollout tcn-vae 1.4.0 --soak 120 --max-p95-ratio 1.3   # stricter, longer soak",
        "imu-fleet rollout tcn-vae 1.4.0 --detach    # plan it; `imu-fleet controller` drives it",
        "imu-fleet rollout tcn-vae 1.4.0 --clear-pins  # node-level pins would keep nodes out",
    ],
)

CONTROLLER = Command(
    "controller",
    "long-running service: drives every rollout whose controller is gone",
    _lazy("cmd_controller"),
    description="Watches the retained rollout records and takes over every running or paused "
    "rollout no live controller drives (a killed or --detach'ed `imu-fleet rollout`, another "
    "service that died). Several may run: the records' take-over epochs decide. Serves "
    "/metrics (bearer token unless on loopback) and /healthz. Unit: "
    "compose/imu-fleet-controller.service.",
    args=[
        arg("--name", help="stable id: its client id is imu-fleet-controller-NAME"),
        arg(
            "--listen",
            default="127.0.0.1:9109",
            help="HOST:PORT for /metrics and /healthz (127.0.0.1:9109)",
        ),
        arg("--token-file", type=Path, help="bearer token for /metrics"),
        arg(
            "--poll",
            type=float,
            default=1.0,
            help="seconds between looks for rollouts to take over (1)",
        ),
        _sign_key("signs what it publishes"),
        _trust_key(),
    ],
    shared=broker_options,
    examples=[
        "imu-fleet controller --sign-key keys/fleet.key",
        "imu-fleet controller --name site-a --listen 0.0.0.0:9109 --token-file ctl.token",
    ],
)

CONTROLS = [
    Command(
        name,
        text,
        _lazy("cmd_control"),
        args=[
            arg("rollout", help="rollout id (see `imu-fleet status`)"),
            _sign_key(),
            _trust_key(),
        ],
        shared=broker_options,
        examples=[example],
    )
    for name, text, example in (
        ("pause", "pause a running rollout after the current step", "imu-fleet pause ID"),
        (
            "resume",
            "resume a paused rollout, or take over one whose controller died",
            "imu-fleet resume ID --sign-key keys/fleet.key",
        ),
        ("abort", "stop a rollout where it is (nodes keep what they run)", "imu-fleet abort ID"),
        (
            "rollback",
            "restore every moved node's previous model; says which nodes confirmed",
            "imu-fleet rollback ID --sign-key keys/fleet.key",
        ),
    )
]

COMMANDS = [
    Command(
        "publish",
        "put a bundle on the broker as retained chunks (fleet/artifacts/...)",
        _lazy("cmd_publish"),
        args=[
            arg("bundle", type=Path),
            arg(
                "--chunk-size",
                type=int,
                default=64 * 1024,
                help="bytes per retained chunk (65536); keep it under the broker's message "
                "size limit",
            ),
            arg("--url", help="file:// or http(s):// copy nodes may download instead"),
            _sign_key("signs the artifact manifest, which a controller with the key requires"),
        ],
        shared=broker_options,
        examples=[
            "imu-fleet publish tcn-vae-1.2.0.tar --broker mqtts://broker.local:8883 "
            "--ca-file ca.crt \\\n      --cert-file fleet-controller.crt "
            "--key-file fleet-controller.key"
        ],
    ),
    ROLLOUT,
    Command(
        "status",
        "rollouts on the broker (one in detail with its id)",
        _lazy("cmd_status"),
        args=[
            arg("rollout", nargs="?"),
            arg("--json", action="store_true", help="the records as JSON, for scripts"),
            arg(
                "--trust-key",
                type=Path,
                help="fleet public key(s): records not signed by one are shown as refused",
            ),
        ],
        shared=broker_options,
        examples=[
            "imu-fleet status",
            "imu-fleet status ROLLOUT-ID   # per node, with the gates' figures",
            "imu-fleet status --json | jq '.[0].state'",
        ],
    ),
    Command(
        "nodes",
        "table: node, online, model, state, windows/s, p95, what it follows",
        _lazy("cmd_nodes"),
        args=[
            arg(
                "forget",
                nargs="*",
                metavar="forget ID",
                help="clear retired nodes' retained status, model state and pin from the broker "
                "(they must be offline; logs in as each node with its pki certificate)",
            ),
            arg("--wait", type=float, default=3.0, help="seconds to collect telemetry (3)"),
            arg("--json", action="store_true", help="one object per node, for scripts"),
            arg(
                "--node-credentials",
                type=Path,
                default=Path("site/clients"),
                help="forget: folder with node-ID.crt and node-ID.key (site/clients)",
            ),
            arg(
                "--node-broker",
                default=None,
                help="forget: where the nodes log in with certificates, when --broker is a "
                "password port (e.g. mqtts://broker.local:8883)",
            ),
        ],
        shared=broker_options,
        examples=[
            "imu-fleet nodes",
            "imu-fleet nodes --json | jq '.[] | select(.drift != null)'",
            "imu-fleet nodes forget pi-0042 --node-credentials site/clients   # a retired Pi",
        ],
    ),
    Command(
        "unpin",
        "clear node-level desired states: the nodes follow their group again",
        _lazy("cmd_unpin"),
        args=[
            arg("nodes", nargs="*", help="node ids"),
            arg("--all", action="store_true", help="every pinned node (of --group)"),
            arg("--group", help="with --all: only this group's nodes"),
            _sign_key(),
        ],
        shared=broker_options,
        examples=[
            "imu-fleet unpin pi-0042 --sign-key keys/fleet.key",
            "imu-fleet unpin --all --group line-3 --sign-key keys/fleet.key",
        ],
    ),
    CONTROLLER,
    *CONTROLS,
]
"""The rollout commands of `imu-fleet`."""
