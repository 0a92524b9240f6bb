"""`imu-fleet`: the fleet tools. Each package declares its own commands (its `cli.py`); this
module collects them, resolves the broker login once, and turns errors into one line."""

from __future__ import annotations

import argparse
import logging
import sys

from common.cli import Command, add_commands, run_main
from common.errors import EdgeError
from common.logs import configure_logging
from common.mqtt.connection import connection_from_args
from fleet.bundles import cli as bundles
from fleet.dashboard import cli as dashboard
from fleet.models import cli as models
from fleet.recording import cli as recording
from fleet.rollout import cli as rollout
from fleet.settings import FleetBrokerSettings
from fleet.simulate import cli as simulate

logger = logging.getLogger("fleet")

COMMANDS: list[Command] = [
    Command(
        "pki",
        "site CA, broker and client certificates, passwords and the broker ACL",
        add_help=False,  # `imu-fleet pki ...` is handed to fleet.pki whole (its own --help)
    ),
    *bundles.COMMANDS,
    *models.COMMANDS,
    *simulate.COMMANDS,
    *recording.COMMANDS,
    *rollout.COMMANDS,
    *dashboard.COMMANDS,
]
"""Every `imu-fleet` command, in the order `--help` lists them."""

EXAMPLES = """\
examples:
  # package an exported TCN-VAE encoder with its training normalisation
  imu-fleet bundle create --onnx encoder.onnx --name tcn-vae --version 1.2.0 \\
      --normalization model_config.json --calibration recorded.npy --out tcn-vae-1.2.0.tar
  imu-fleet bundle inspect tcn-vae-1.2.0.tar
  imu-fleet bundle reference --out tcn-reference-1.0.0.tar   # the built-in test model
  imu-fleet model validate tcn-vae-1.2.0.tar     # parity of every backend found here
  imu-fleet model compile tcn-vae-1.2.0.tar --calibration rec.jsonl.gz --hw-arch hailo8 \\
      --out tcn-vae-1.2.0-hailo8.tar             # on the x86-64 host with Hailo's DFC
  imu-fleet simulate sensors --broker mqtt://localhost:1883 --sensors 8 --rate 100
  imu-fleet publish tcn-vae-1.2.0.tar --broker mqtt://broker:1883
  imu-fleet rollout tcn-vae 1.2.0 --group line-3 --canary 1 --waves 10,50,100 --max-failures 1
  imu-fleet nodes; imu-fleet status; imu-fleet pause|resume|abort|rollback ROLLOUT_ID
  imu-fleet dashboard --broker mqtts://broker:8884 --ca-file ca.crt --username dashboard-ops \\
      --password-file dash.password --listen 0.0.0.0:8090 --token-file dash.token
  imu-fleet record --broker mqtt://localhost:1883 --topic 'imu/+/window' --out rec.jsonl.gz
  imu-fleet replay rec.jsonl.gz --broker mqtt://localhost:1883 --rate 2

every command has its own --help with examples
"""


def build_parser() -> argparse.ArgumentParser:
    """The full `imu-fleet` argument parser."""
    parser = argparse.ArgumentParser(
        prog="imu-fleet",
        description="Fleet tools: model bundles, sites, rollouts, simulation and the dashboard.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"), COMMANDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `imu-fleet`."""
    return run_main("imu-fleet", lambda: _main(sys.argv[1:] if argv is None else argv))


def _main(argv: list[str]) -> int:
    if argv[:1] == ["pki"]:
        from fleet.pki import main as pki_main  # noqa: PLC0415

        return pki_main(argv[1:])
    args = build_parser().parse_args(argv)
    configure_logging("INFO", json_lines=False)
    try:
        if hasattr(args, "mqtt_protocol"):  # a command that talks to the broker
            connection = connection_from_args(args, FleetBrokerSettings)
            args.broker, args.mqtt_protocol = connection, connection.protocol
        return int(args.handler(args))
    except (EdgeError, ValueError, ConnectionError, OSError) as exc:
        print(f"imu-fleet: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
