"""`imu-fleet`: build and inspect model bundles, simulate sensors."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import EdgeError
from common.logs import configure_logging
from common.mqtt.connection import Credentials, add_broker_arguments, connection_from_args
from fleet.settings import ENV_PREFIX, FleetBrokerSettings

if TYPE_CHECKING:
    from common.bundle import Bundle

logger = logging.getLogger("fleet")

Subparsers = argparse._SubParsersAction  # argparse exposes no public name for it

EXAMPLES = """\
examples:
  # package an exported TCN-VAE encoder with its training normalisation
  imu-fleet bundle create --onnx encoder.onnx --name tcn-vae --version 1.2.0 \\
      --normalization model_config.json --calibration recorded.npy --out tcn-vae-1.2.0.tar
  imu-fleet bundle inspect tcn-vae-1.2.0.tar
  imu-fleet bundle reference --out tcn-reference-1.0.0.tar   # the built-in test model
  imu-fleet model validate tcn-vae-1.2.0.tar     # parity of every backend found here
  imu-fleet model compile tcn-vae-1.2.0.tar --calibration rec.jsonl.gz --hw-arch hailo8 \
      --out tcn-vae-1.2.0-hailo8.tar             # on the x86-64 host with Hailo's DFC
  imu-fleet simulate sensors --broker mqtt://localhost:1883 --sensors 8 --rate 100
  imu-fleet publish tcn-vae-1.2.0.tar --broker mqtt://broker:1883
  imu-fleet rollout tcn-vae 1.2.0 --group line-3 --canary 1 --waves 10,50,100 --max-failures 1
  imu-fleet nodes; imu-fleet status; imu-fleet pause|resume|abort|rollback ROLLOUT_ID
  imu-fleet dashboard --broker mqtts://broker:8884 --ca-file ca.crt --username dashboard-ops \
      --password-file dash.password --listen 0.0.0.0:8090 --token-file dash.token
  imu-fleet record --broker mqtt://localhost:1883 --topic 'imu/+/window' --out rec.jsonl.gz
  imu-fleet replay rec.jsonl.gz --broker mqtt://localhost:1883 --rate 2
"""


def build_parser() -> argparse.ArgumentParser:
    """The full `imu-fleet` argument parser."""
    parser = argparse.ArgumentParser(
        prog="imu-fleet",
        description="Fleet tools: model bundles and sensor simulation.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "pki",
        help="site CA, broker and client certificates, passwords and the broker ACL",
        add_help=False,
    )  # `imu-fleet pki ...` is handed to fleet.pki whole (its own --help)

    _add_bundle(sub)
    _add_keys(sub)
    _add_model(sub)
    _add_simulate(sub)
    _add_recording(sub)
    _add_rollouts(sub)
    _add_dashboard(sub)
    _add_examples(parser)
    return parser


COMMAND_EXAMPLES: dict[tuple[str, ...], str] = {
    ("bundle", "create"): "imu-fleet bundle create --onnx encoder.onnx --name tcn-vae --version "
    "1.2.0 \\\n      --normalization model_config.json --calibration recorded.npy \\\n"
    "      --motif-labels labels.txt --expires 180d --sign-key keys/fleet.key "
    "--out tcn-vae-1.2.0.tar",
    ("bundle", "sign"): "imu-fleet bundle sign tcn-vae-1.2.0.tar --key keys/fleet.key "
    "--expires 2027-06-30",
    ("bundle", "inspect"): "imu-fleet bundle inspect tcn-vae-1.2.0.tar --trust-key keys/fleet.pub",
    ("bundle", "reference"): "imu-fleet bundle reference --out tcn-reference-1.0.0.tar",
    ("keys", "generate"): "imu-fleet keys generate --out keys/   # keep fleet.key offline",
    ("model", "validate"): "imu-fleet model validate tcn-vae-1.2.0.tar",
    ("model", "compile"): "imu-fleet model compile tcn-vae-1.2.0.tar --calibration rec.jsonl.gz "
    "--hw-arch hailo8 --out tcn-vae-1.2.0-hailo8.tar",
    ("simulate", "sensors"): "imu-fleet simulate sensors --broker mqtt://127.0.0.1:1883 "
    "--sensors 8 --rate 100 --mode window --encoding binary",
    ("simulate", "nodes"): "imu-fleet simulate nodes --count 1000 --bundle "
    "tcn-reference-1.0.0.tar \\\n      --telemetry-interval 10 --degrade 1.4.0=errors",
    ("record",): "imu-fleet record --topic 'imu/+/window' --out rec.jsonl.gz --duration 600 "
    "--broker mqtt://broker.local:1883",
    ("replay",): "imu-fleet replay rec.jsonl.gz --rate 10 --broker mqtt://127.0.0.1:1883",
    ("publish",): "imu-fleet publish tcn-vae-1.2.0.tar --broker mqtts://broker.local:8883 "
    "--ca-file ca.crt \\\n      --cert-file fleet-controller.crt --key-file fleet-controller.key",
}
"""An example for each command whose help has none of its own."""


def _add_examples(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> None:
    """Give every command's `--help` an example (COMMAND_EXAMPLES), keeping its own."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                _add_examples(child, (*path, name))
    if path in COMMAND_EXAMPLES and "example" not in (parser.epilog or ""):
        parser.epilog = f"example:\n  {COMMAND_EXAMPLES[path]}"
        parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _add_bundle(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """`imu-fleet bundle create|sign|inspect|reference`."""
    bundle = sub.add_parser("bundle", help="create or inspect model bundles")
    bundle_sub = bundle.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = bundle_sub.add_parser(
        "create",
        help="package an ONNX encoder as a bundle",
        description=(
            "Package an ONNX model ([1,100,9] float32 in, [1,64] latent out) as a bundle: reads "
            "the tensor names from the model, adds normalisation, a 12-motif head fitted on the "
            "calibration latents (when the model has no motif output) and golden vectors."
        ),
    )
    create.add_argument("--onnx", type=Path, required=True, help="the exported ONNX model")
    create.add_argument("--name", required=True, help="model name (lowercase, e.g. tcn-vae)")
    create.add_argument("--version", required=True, help="semantic version, e.g. 1.2.0")
    create.add_argument("--out", type=Path, required=True, help="bundle file to write (.tar)")
    create.add_argument(
        "--normalization",
        type=Path,
        help="JSON with mean/std (9 each), or the exporter's model_config.json: the statistics "
        "the model was trained with (required, unless --normalization-from-calibration)",
    )
    create.add_argument(
        "--normalization-from-calibration", action="store_true",
        help="derive mean/std from the calibration set instead, on purpose: right for the "
        "simulator and tests, wrong for a model trained on other data",
    )  # fmt: skip
    create.add_argument(
        "--expires", metavar="WHEN",
        help="nodes refuse the bundle after this: a duration (90d, 12h) or a time (2027-06-30)",
    )  # fmt: skip
    create.add_argument(
        "--calibration",
        type=Path,
        help="recorded windows: .npy (N,100,9), .npz (windows[, labels]) or .jsonl window "
        "messages (default: the simulator's activities, 384 windows)",
    )
    create.add_argument("--description", default="", help="free text stored in the manifest")
    create.add_argument("--sign-key", type=Path, help="fleet private key: sign the bundle")
    create.add_argument(
        "--motif-labels", metavar="NAMES|FILE",
        help="names of the 12 motifs for dashboards, in index order: comma-separated "
        "(rest,walk,...) or a file with one per line; 1-32 characters each",
    )  # fmt: skip
    create.add_argument("--hef", type=Path, help="compiled Hailo HEF of the same model")
    create.add_argument(
        "--hef-arch", choices=["hailo8", "hailo8l"], default="hailo8",
        help="chip the HEF was compiled for (hailo8)",
    )  # fmt: skip

    sign = bundle_sub.add_parser("sign", help="sign an existing bundle with the fleet key")
    sign.add_argument("bundle", type=Path)
    sign.add_argument("--key", type=Path, required=True, help="private key (fleet.key)")
    sign.add_argument("--out", type=Path, help="signed copy (default: sign in place)")
    sign.add_argument(
        "--expires", metavar="WHEN",
        help="set the expiry the signature covers: a duration (90d, 12h) or a time (2027-06-30)",
    )  # fmt: skip

    inspect = bundle_sub.add_parser("inspect", help="verify a bundle and print its manifest")
    inspect.add_argument("bundle", type=Path)
    inspect.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    inspect.add_argument("--trust-key", type=Path, help="also verify the signature with this key")

    reference = bundle_sub.add_parser("reference", help="write the built-in reference bundle")
    reference.add_argument("--out", type=Path, required=True)
    reference.add_argument("--version", default="1.0.0")
    reference.add_argument("--seed", type=int, default=7, help="weights seed (7)")
    reference.add_argument(
        "--dynamic-batch", action="store_true", help="export with a dynamic batch dimension"
    )


def _add_keys(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """`imu-fleet keys generate`."""
    keys = sub.add_parser("keys", help="fleet signing keys")
    keys_sub = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = keys_sub.add_parser(
        "generate", help="write an Ed25519 key pair: fleet.key (private, 0600) and fleet.pub"
    )
    generate.add_argument("--out", type=Path, required=True, help="folder for the two files")
    generate.add_argument("--force", action="store_true", help="overwrite an existing pair")


def _add_model(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """`imu-fleet model validate`."""
    model = sub.add_parser("model", help="validate models across backends, compile HEFs")
    model_sub = model.add_subparsers(dest="action", required=True, metavar="ACTION")
    validate = model_sub.add_parser(
        "validate",
        help="parity table: every backend available here vs ONNX Runtime",
        description="Runs the bundle on every backend this machine has, on its golden windows "
        "and a calibration set, and prints cosine similarity and max error against ONNX "
        "Runtime. Bar: mean cosine >= 0.99 (float), >= 0.95 (quantised HEF). Exit 1 if a "
        "backend that ran misses its bar or its golden check.",
    )
    validate.add_argument("bundle", type=Path)
    validate.add_argument(
        "--calibration", type=Path, help="windows file (.npy/.npz/.jsonl); default: simulator"
    )
    compile_ = model_sub.add_parser(
        "compile",
        help="ONNX -> HEF with Hailo's Dataflow Compiler (x86-64 host, not the Pi)",
        description="Translates the bundle's ONNX, optimises (quantises) it on the calibration "
        "windows, checks the emulator against ONNX Runtime (native >= 0.99, quantised >= 0.95 "
        "mean cosine, and the node's own golden check), compiles, and writes a new bundle with "
        "both model.hef and model.onnx. Needs hailo_sdk_client (DFC 3.x).",
    )
    compile_.add_argument("bundle", type=Path)
    compile_.add_argument(
        "--calibration", type=Path, required=True,
        help="recorded windows (.jsonl[.gz] recording, .npy, .npz); Hailo suggests >= 1024",
    )  # fmt: skip
    compile_.add_argument("--hw-arch", choices=["hailo8", "hailo8l"], required=True)
    compile_.add_argument("--out", type=Path, required=True, help="the new bundle")
    compile_.add_argument("--optimization-level", type=int, choices=range(5), default=None)


def _add_simulate(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """`imu-fleet simulate sensors|nodes`."""
    simulate = sub.add_parser("simulate", help="simulate sensors or fleet nodes")
    sim_sub = simulate.add_subparsers(dest="what", required=True, metavar="WHAT")
    sensors = sim_sub.add_parser("sensors", help="publish simulated IMU sensors in real time")
    sensors.add_argument("--sensors", type=int, default=4, help="how many sensors (4)")
    sensors.add_argument("--rate", type=float, default=100.0, help="samples/s per sensor (100)")
    sensors.add_argument(
        "--mode", choices=["samples", "window"], default="samples",
        help="publish sample runs on imu/ID/samples or whole windows on imu/ID/window",
    )  # fmt: skip
    sensors.add_argument("--hop", type=int, default=50, help="window mode: samples per window (50)")
    sensors.add_argument(
        "--encoding", choices=["json", "binary"], default="json",
        help="window mode: JSON windows, or binary frames with their seq in the header "
        "(docs/topics.md, Binary frames)",
    )  # fmt: skip
    sensors.add_argument("--interval", type=float, default=0.1, help="seconds between messages")
    sensors.add_argument("--prefix", default="sim", help="sensor ids are PREFIX-000, ... (sim)")
    sensors.add_argument("--duration", type=float, default=None, help="seconds (default: forever)")
    _broker_options(sensors)
    sensors.add_argument("--seed", type=int, default=0)

    nodes = sim_sub.add_parser(
        "nodes",
        help="run N lightweight nodes (real MQTT clients, the real model manager) for rollouts",
        description="Each simulated node connects on its own, publishes birth/will, telemetry "
        "and model state, and follows desired state with the same model manager code as a "
        "real node (fetch, verify, load, golden check, swap); inference is shared per version.",
    )
    nodes.add_argument("--count", type=int, required=True, help="how many nodes")
    nodes.add_argument("--bundle", type=Path, required=True, help="the model they start on")
    nodes.add_argument("--prefix", default="sim", help="node ids are PREFIX-0000, ... (sim)")
    nodes.add_argument("--groups", type=int, default=1, help="spread over PREFIX-g0.. (1)")
    nodes.add_argument("--duration", type=float, default=None, help="seconds (default: forever)")
    nodes.add_argument("--trust-key", type=Path, help="fleet public key the nodes require")
    nodes.add_argument("--telemetry-interval", type=float, default=5.0,
                       help="seconds between a node's telemetry messages (5)")  # fmt: skip
    nodes.add_argument(
        "--degrade", action="append", default=[], metavar="VERSION=MODE",
        help="make nodes serving VERSION degrade once it is active, to try health gates: "
        "errors (every window fails), latency (+80 ms), crash (restart every interval)",
    )  # fmt: skip
    _broker_options(nodes)


def _add_recording(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """`imu-fleet record` and `imu-fleet replay`."""
    record = sub.add_parser(
        "record",
        help="capture sensor traffic to a file (calibration set and replay input)",
        description="Subscribes (QoS 1) and writes every message as a JSON line with its time "
        "offset; binary frames are kept byte for byte. Use the file as --calibration for "
        "bundle create / model compile, or feed it back with `imu-fleet replay`.",
    )
    record.add_argument(
        "--topic", action="append", required=True,
        help="topic filter, repeatable (e.g. 'imu/+/window')",
    )  # fmt: skip
    record.add_argument("--out", type=Path, required=True, help="file (.jsonl or .jsonl.gz)")
    record.add_argument("--duration", type=float, help="seconds (default: until Ctrl-C)")
    record.add_argument("--max-messages", type=int, help="stop after this many messages")
    _broker_options(record)

    replay = sub.add_parser("replay", help="publish a recording again, at its pace or faster")
    replay.add_argument("file", type=Path)
    replay.add_argument(
        "--rate", type=float, default=1.0, help="speed factor: 2 = twice as fast, 0 = flat out"
    )
    replay.add_argument("--loop", action="store_true", help="start over at the end")
    replay.add_argument(
        "--rewrite", action="append", metavar="OLD=NEW",
        help="replace a topic prefix, e.g. imu/s1=imu/replay-1 (repeatable)",
    )  # fmt: skip
    _broker_options(replay)


def _broker_options(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser, ENV_PREFIX)


def _add_rollouts(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """`imu-fleet publish|rollout|status|nodes|pause|resume|abort|rollback`."""
    publish = sub.add_parser(
        "publish", help="put a bundle on the broker as retained chunks (fleet/artifacts/...)"
    )
    publish.add_argument("bundle", type=Path)
    publish.add_argument(
        "--chunk-size", type=int, default=64 * 1024,
        help="bytes per retained chunk (65536); keep it under the broker's message size limit",
    )  # fmt: skip
    publish.add_argument("--url", help="file:// or http(s):// copy nodes may download instead")
    _broker_options(publish)

    rollout = sub.add_parser(
        "rollout",
        help="roll a published version out in waves, health-gated; rolls back past the budget",
        description="Moves nodes by setting their node-level desired state: a canary wave, then "
        "waves reaching each cumulative percentage. A wave's nodes must report the new version "
        "active within --wave-timeout, then the wave soaks (--soak) and each moved node's "
        "telemetry is judged against its own before the move and the nodes not moved yet: error "
        "rate, p95 latency, results per window in, restarts and going offline. More than "
        "--max-failures failed nodes stop the rollout and restore each moved node's previous "
        "model; the record names those that did not confirm it. On success the group (or "
        "fleet-wide) desired state names the new version. The record is retained on "
        "fleet/rollouts/ID; a running `imu-fleet controller` (or `imu-fleet resume ID`) "
        "continues one whose controller died.",
        epilog="""examples:
  imu-fleet rollout tcn-vae 1.4.0 --group line-3 --canary 1 --waves 25,50,100 \\
      --max-failures 1 --sign-key keys/fleet.key
  imu-fleet rollout tcn-vae 1.4.0 --soak 120 --max-p95-ratio 1.3   # stricter, longer soak
  imu-fleet rollout tcn-vae 1.4.0 --detach    # plan it; `imu-fleet controller` drives it
  imu-fleet rollout tcn-vae 1.4.0 --clear-pins  # node-level pins would keep nodes out
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rollout.add_argument("name")
    rollout.add_argument("version")
    rollout.add_argument("--group", help="only nodes of this group (default: every node)")
    rollout.add_argument("--canary", type=int, default=1, help="nodes in the first wave (1)")
    rollout.add_argument(
        "--waves", default="10,50,100", help="cumulative percentages of nodes per wave"
    )
    rollout.add_argument("--max-failures", type=int, default=0, help="failed nodes tolerated")
    rollout.add_argument("--wave-timeout", type=float, default=120.0, help="seconds per wave")
    gates = rollout.add_argument_group("health gates (per wave, after its nodes are active)")
    gates.add_argument(
        "--soak", type=float,
        help="seconds each wave soaks (default: 3 telemetry intervals of its nodes, 30 s at "
        "the default 10 s)",
    )  # fmt: skip
    gates.add_argument(
        "--max-error-rate",
        type=float,
        default=0.02,
        help="node-side errors per window allowed above the reference (0.02)",
    )
    gates.add_argument(
        "--max-p95-ratio",
        type=float,
        default=1.5,
        help="p95 allowed, as a multiple of the reference (1.5)",
    )
    gates.add_argument(
        "--p95-floor-ms", type=float, default=10.0, help="a p95 under this always passes (10 ms)"
    )
    gates.add_argument(
        "--min-results-ratio",
        type=float,
        default=0.95,
        help="results per window in, as a share of the node's own before (0.95)",
    )
    gates.add_argument(
        "--no-gates",
        action="store_true",
        help="pass a wave as soon as its nodes are active (no soak, no health)",
    )
    rollout.add_argument(
        "--clear-pins", action="store_true",
        help="clear node-level desired states of nodes left out of the rollout first (without "
        "it, they are listed: they would stay on their pinned version)",
    )  # fmt: skip
    rollout.add_argument(
        "--detach",
        action="store_true",
        help="plan and leave it to a running `imu-fleet controller`",
    )
    rollout.add_argument(
        "--sign-key", type=Path, help="fleet private key: sign desired states (required when "
        "nodes have a trust key)",
    )  # fmt: skip
    _broker_options(rollout)

    status = sub.add_parser(
        "status", help="rollouts on the broker (one in detail with its id)",
        epilog="examples:\n  imu-fleet status\n  imu-fleet status ROLLOUT-ID   # per node, with "
        "the gates' figures\n  imu-fleet status --json | jq '.[0].state'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    status.add_argument("rollout", nargs="?")
    status.add_argument("--json", action="store_true", help="the records as JSON, for scripts")
    _broker_options(status)

    nodes = sub.add_parser(
        "nodes", help="table: node, online, model, state, windows/s, p95, what it follows",
        epilog="examples:\n  imu-fleet nodes\n  imu-fleet nodes --json | jq '.[] | "
        "select(.drift != null)'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    nodes.add_argument("--wait", type=float, default=3.0, help="seconds to collect telemetry (3)")
    nodes.add_argument("--json", action="store_true", help="one object per node, for scripts")
    _broker_options(nodes)

    unpin = sub.add_parser(
        "unpin", help="clear node-level desired states: the nodes follow their group again",
        epilog="examples:\n  imu-fleet unpin pi-0042 --sign-key keys/fleet.key\n"
        "  imu-fleet unpin --all --group line-3 --sign-key keys/fleet.key",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    unpin.add_argument("nodes", nargs="*", help="node ids")
    unpin.add_argument("--all", action="store_true", help="every pinned node (of --group)")
    unpin.add_argument("--group", help="with --all: only this group's nodes")
    unpin.add_argument("--sign-key", type=Path, help="fleet private key (required when nodes "
                       "have a trust key)")  # fmt: skip
    _broker_options(unpin)

    controller = sub.add_parser(
        "controller",
        help="long-running service: drives every rollout whose controller is gone",
        description="Watches the retained rollout records and takes over every running or "
        "paused rollout no live controller drives (a killed or --detach'ed `imu-fleet "
        "rollout`, another service that died). Several may run: the records' take-over epochs "
        "decide. Serves /metrics (bearer token unless on loopback) and /healthz. Unit: "
        "compose/imu-fleet-controller.service.",
        epilog="examples:\n  imu-fleet controller --sign-key keys/fleet.key\n"
        "  imu-fleet controller --name site-a --listen 0.0.0.0:9109 --token-file ctl.token",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    controller.add_argument("--name", help="stable id: its client id is imu-fleet-controller-NAME")
    controller.add_argument(
        "--listen",
        default="127.0.0.1:9109",
        help="HOST:PORT for /metrics and /healthz (127.0.0.1:9109)",
    )
    controller.add_argument("--token-file", type=Path, help="bearer token for /metrics")
    controller.add_argument(
        "--poll",
        type=float,
        default=1.0,
        help="seconds between looks for rollouts to take over (1)",
    )
    controller.add_argument("--sign-key", type=Path, help="fleet private key (signs what it "
                            "publishes; required when nodes have a trust key)")  # fmt: skip
    _broker_options(controller)

    for command, text, example in (
        ("pause", "pause a running rollout after the current step", "imu-fleet pause ID"),
        ("resume", "resume a paused rollout, or take over one whose controller died",
         "imu-fleet resume ID --sign-key keys/fleet.key"),
        ("abort", "stop a rollout where it is (nodes keep what they run)", "imu-fleet abort ID"),
        ("rollback", "restore every moved node's previous model; says which nodes confirmed",
         "imu-fleet rollback ID --sign-key keys/fleet.key"),
    ):  # fmt: skip
        control = sub.add_parser(command, help=text, epilog=f"example:\n  {example}",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        control.add_argument("rollout", help="rollout id (see `imu-fleet status`)")
        control.add_argument("--sign-key", type=Path, help="fleet private key (required when "
                             "nodes have a trust key)")  # fmt: skip
        _broker_options(control)


DASHBOARD_EXAMPLES = """\
examples:
  # on this machine only (no token needed on loopback): http://127.0.0.1:8090/
  imu-fleet dashboard --broker mqtt://127.0.0.1:1883
  # for the site, read-only login, token and HTTPS; open https://HOST:8090/?token=TOKEN once
  head -c 24 /dev/urandom | base64 > dash.token; chmod 600 dash.token
  imu-fleet dashboard --broker mqtts://broker.local:8884 --ca-file ca.crt \\
      --username dashboard-ops --password-file dashboard-ops.password \\
      --listen 0.0.0.0:8090 --token-file dash.token --tls-cert dash.crt --tls-key dash.key
  curl -H "Authorization: Bearer $(cat dash.token)" https://HOST:8090/metrics
"""


def _add_dashboard(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """`imu-fleet dashboard`."""
    dashboard = sub.add_parser(
        "dashboard",
        help="live web page of the fleet: nodes, rollouts, per-sensor motif ethograms",
        description="Subscribes to the broker (the read-only dashboard role is enough) and "
        "serves one page that updates live over server-sent events, plus /metrics for "
        "Prometheus. The browser never talks to the broker. A token is required unless "
        "--listen is loopback or --open is given. See docs/dashboard.md.",
        epilog=DASHBOARD_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dashboard.add_argument(
        "--listen", default="127.0.0.1:8090",
        help="HOST:PORT to serve on (127.0.0.1:8090; 0.0.0.0:8090 for the network)",
    )  # fmt: skip
    dashboard.add_argument(
        "--token-file", type=Path,
        help="file holding the token the page, /events and /metrics require",
    )  # fmt: skip
    dashboard.add_argument(
        "--open", action="store_true",
        help="serve beyond loopback without a token: anyone who reaches the port sees the fleet",
    )  # fmt: skip
    dashboard.add_argument("--tls-cert", type=Path, help="HTTPS: certificate chain (PEM)")
    dashboard.add_argument("--tls-key", type=Path, help="HTTPS: its private key (PEM)")
    dashboard.add_argument(
        "--max-sensors", type=int, default=500, help="sensors shown at most (500)"
    )
    dashboard.add_argument(
        "--max-pages", type=int, default=32, help="pages connected at once at most (32)"
    )
    _broker_options(dashboard)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `imu-fleet`."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pki"]:
        from fleet.pki import main as pki_main  # noqa: PLC0415

        return pki_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging("INFO", json_lines=False)
    commands = {
        "bundle": _bundle,
        "model": _model,
        "keys": _keys,
        "record": _recording,
        "replay": _recording,
        "simulate": _simulate,
        "publish": _rollouts,
        "rollout": _rollouts,
        "status": _rollouts,
        "nodes": _rollouts,
        "unpin": _rollouts,
        "controller": _rollouts,
        "pause": _rollouts,
        "resume": _rollouts,
        "abort": _rollouts,
        "rollback": _rollouts,
        "dashboard": _dashboard,
    }
    try:
        if hasattr(args, "mqtt_protocol"):  # a command that talks to the broker
            connection = connection_from_args(args, FleetBrokerSettings)
            args.broker, args.mqtt_protocol = connection, connection.protocol
        return commands[args.command](args)
    except (EdgeError, ValueError, ConnectionError, OSError) as exc:
        print(f"imu-fleet: {exc}", file=sys.stderr)
        return 1


def _bundle(args: argparse.Namespace) -> int:
    from common.bundle import manifest_bytes, read_bundle  # noqa: PLC0415
    from common.signing import load_public_key, verify_manifest  # noqa: PLC0415
    from fleet.bundles.builder import (  # noqa: PLC0415 (onnxruntime)
        build_bundle,
        parse_expiry,
        parse_motif_labels,
        sign_bundle,
    )
    from fleet.bundles.inspect import describe_bundle  # noqa: PLC0415
    from fleet.bundles.reference import build_reference_bundle  # noqa: PLC0415
    from schemas.manifest import HefInfo  # noqa: PLC0415

    if args.action == "create":
        if args.normalization is None and not args.normalization_from_calibration:
            msg = (
                "no --normalization: a model needs the mean/std it was trained with (the "
                "exporter's model_config.json); without them it computes garbage on real data. "
                "Pass --normalization-from-calibration to derive them from the calibration set "
                "on purpose (simulator data, tests)"
            )
            raise ValueError(msg)
        bundle = build_bundle(
            onnx_path=args.onnx,
            name=args.name,
            version=args.version,
            out=args.out,
            normalization=args.normalization,
            calibration=args.calibration,
            description=args.description,
            hef=args.hef,
            hef_info=HefInfo(hw_arch=args.hef_arch) if args.hef else None,
            sign_key=args.sign_key,
            motif_labels=parse_motif_labels(args.motif_labels) if args.motif_labels else None,
            expires_at=parse_expiry(args.expires) if args.expires else None,
        )
        print(describe_bundle(bundle))
        return 0
    if args.action == "sign":
        expires = parse_expiry(args.expires) if args.expires else None
        signed = sign_bundle(read_bundle(args.bundle), args.key, args.out or args.bundle,
                             expires_at=expires)  # fmt: skip
        print(describe_bundle(signed))
        return 0
    if args.action == "reference":
        path = build_reference_bundle(
            args.out, version=args.version, seed=args.seed, batch=None if args.dynamic_batch else 1
        )
        print(describe_bundle(read_bundle(path)))
        return 0
    bundle = read_bundle(args.bundle)
    if args.trust_key:
        verify_manifest(bundle.manifest, load_public_key(args.trust_key))
    print(manifest_bytes(bundle.manifest).decode() if args.json else describe_bundle(bundle))
    return 0


def _keys(args: argparse.Namespace) -> int:
    from common.signing import generate_keys  # noqa: PLC0415

    pair = generate_keys(args.out, overwrite=args.force)
    print(f"private key {pair.private} (keep it secret: sign with --sign-key)")
    print(f"public key  {pair.public} (give it to nodes: --trust-key)")
    print(f"key id      {pair.key_id}")
    return 0


def _model(args: argparse.Namespace) -> int:
    from common.bundle import read_bundle  # noqa: PLC0415
    from fleet.bundles.calibration import load_calibration, simulated_calibration  # noqa: PLC0415
    from fleet.models.validate import format_table, validate_bundle  # noqa: PLC0415

    bundle = read_bundle(args.bundle)
    if args.action == "compile":
        return _compile(args, bundle)
    calib = load_calibration(args.calibration) if args.calibration else simulated_calibration(32)
    rows = validate_bundle(bundle, calib)
    print(format_table(rows, calib.source))
    ran = [row for row in rows if not row.status.startswith("skipped")]
    return 0 if ran and all(row.passed for row in ran) else 1


def _compile(args: argparse.Namespace, bundle: Bundle) -> int:
    from fleet.bundles.calibration import load_calibration  # noqa: PLC0415
    from fleet.compile import compile_bundle  # noqa: PLC0415

    report = compile_bundle(
        bundle,
        load_calibration(args.calibration),
        hw_arch=args.hw_arch,
        out=args.out,
        optimization_level=args.optimization_level,
    )
    print(
        f"wrote {report.out} ({report.hw_arch}, {report.compiler}): quantised vs native cosine "
        f"mean {report.cosine_mean:.5f} min {report.cosine_min:.5f}, max abs error "
        f"{report.max_abs_error:.3g}; native vs ONNX cosine {report.native_cosine_mean:.5f}"
    )
    return 0


def _recording(args: argparse.Namespace) -> int:
    from fleet.recording import parse_rewrite, record, replay  # noqa: PLC0415

    def progress(stats: Any) -> None:
        print(f"\r{stats.summary()}", end="", file=sys.stderr, flush=True)

    stats: Any
    if args.command == "record":
        stats = record(
            args.broker,
            args.topic,
            args.out,
            duration=args.duration,
            max_messages=args.max_messages,
            protocol=args.mqtt_protocol,
            progress=progress,
        )
    else:
        stats = replay(
            args.file,
            args.broker,
            rate=args.rate,
            loop=args.loop,
            protocol=args.mqtt_protocol,
            rewrite=dict(parse_rewrite(spec) for spec in args.rewrite or []),
            progress=progress,
        )
    print(f"\r{stats.summary()}", file=sys.stderr)
    return 0


def _rollouts(args: argparse.Namespace) -> int:
    from fleet.rollout import commands  # noqa: PLC0415

    handlers = {
        "publish": commands.cmd_publish,
        "rollout": commands.cmd_rollout,
        "status": commands.cmd_status,
        "nodes": commands.cmd_nodes,
        "unpin": commands.cmd_unpin,
        "controller": commands.cmd_controller,
    }
    return handlers.get(args.command, commands.cmd_control)(args)


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


def _simulate(args: argparse.Namespace) -> int:
    from fleet.simulate.sensors import SensorSimulator  # noqa: PLC0415

    if args.what == "nodes":
        from fleet.simulate.nodes import simulate_nodes  # noqa: PLC0415

        def connected(done: int, total: int) -> None:
            print(f"\rconnected {done}/{total}", end="", file=sys.stderr, flush=True)

        if args.broker.credentials != Credentials():
            msg = "simulated nodes do not log in: run them against an open test broker"
            raise ValueError(msg)
        degrade = {}
        for item in args.degrade:
            version, _, mode = item.partition("=")
            if mode not in ("errors", "latency", "crash"):
                msg = f"--degrade {item!r}: give VERSION=errors|latency|crash"
                raise ValueError(msg)
            degrade[version] = mode
        return simulate_nodes(
            str(args.broker.address), args.bundle, args.count, prefix=args.prefix,
            groups=args.groups, telemetry_interval_s=args.telemetry_interval,
            trust_key=args.trust_key, protocol=args.mqtt_protocol, duration=args.duration,
            progress=connected, degrade=degrade,
        )  # fmt: skip

    simulator = SensorSimulator(
        args.broker,
        sensors=args.sensors,
        rate_hz=args.rate,
        mode=args.mode,
        interval_s=args.interval,
        hop=args.hop,
        prefix=args.prefix,
        seed=args.seed,
        protocol=args.mqtt_protocol,
        encoding=args.encoding,
    )
    print(
        f"publishing {args.sensors} sensors ({', '.join(simulator.sensor_ids[:3])}"
        f"{', ...' if args.sensors > 3 else ''}) at {args.rate:g} Hz as {args.mode} to "
        f"{args.broker}; Ctrl-C to stop",
        file=sys.stderr,
    )

    def progress(stats: object) -> None:
        print(f"\r{stats}", end="", file=sys.stderr, flush=True)

    try:
        simulator.run_for(args.duration, progress)
    except KeyboardInterrupt:
        simulator.stop()
    print(file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
