"""`imu-fleet bundle create|sign|inspect|reference` and `imu-fleet keys generate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import Command, arg

EXPIRES_HELP = "a duration (90d, 12h) or a time (2027-06-30)"


def _create(args: argparse.Namespace) -> int:
    from fleet.bundles.builder import (  # noqa: PLC0415 (onnxruntime)
        build_bundle,
        parse_expiry,
        parse_motif_labels,
    )
    from fleet.bundles.inspect import describe_bundle  # noqa: PLC0415
    from schemas.manifest import HefInfo  # noqa: PLC0415

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


def _sign(args: argparse.Namespace) -> int:
    from common.bundle import read_bundle  # noqa: PLC0415
    from fleet.bundles.builder import parse_expiry, sign_bundle  # noqa: PLC0415
    from fleet.bundles.inspect import describe_bundle  # noqa: PLC0415

    expires = parse_expiry(args.expires) if args.expires else None
    signed = sign_bundle(
        read_bundle(args.bundle), args.key, args.out or args.bundle, expires_at=expires
    )
    print(describe_bundle(signed))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from common.bundle import manifest_bytes, read_bundle  # noqa: PLC0415
    from common.signing import load_trust  # noqa: PLC0415
    from fleet.bundles.inspect import describe_bundle  # noqa: PLC0415

    trust = load_trust(args.trust_key) if args.trust_key else None
    bundle = read_bundle(args.bundle, trust=trust)  # the signature before the files
    print(manifest_bytes(bundle.manifest).decode() if args.json else describe_bundle(bundle))
    return 0


def _reference(args: argparse.Namespace) -> int:
    from common.bundle import read_bundle  # noqa: PLC0415
    from fleet.bundles.inspect import describe_bundle  # noqa: PLC0415
    from fleet.bundles.reference import build_reference_bundle  # noqa: PLC0415

    path = build_reference_bundle(
        args.out, version=args.version, seed=args.seed, batch=None if args.dynamic_batch else 1
    )
    print(describe_bundle(read_bundle(path)))
    return 0


def _generate_keys(args: argparse.Namespace) -> int:
    from common.signing import generate_keys  # noqa: PLC0415

    pair = generate_keys(args.out, overwrite=args.force)
    print(f"private key {pair.private} (keep it secret: sign with --sign-key)")
    print(f"public key  {pair.public} (give it to nodes: --trust-key)")
    print(f"key id      {pair.key_id}")
    return 0


CREATE = Command(
    "create",
    "package an ONNX encoder as a bundle",
    _create,
    description=(
        "Package an ONNX model ([1,100,9] float32 in, [1,64] latent out) as a bundle: reads the "
        "tensor names from the model, adds normalisation, a 12-motif head fitted on the "
        "calibration latents (when the model has no motif output) and golden vectors."
    ),
    args=[
        arg("--onnx", type=Path, required=True, help="the exported ONNX model"),
        arg("--name", required=True, help="model name (lowercase, e.g. tcn-vae)"),
        arg("--version", required=True, help="semantic version, e.g. 1.2.0"),
        arg("--out", type=Path, required=True, help="bundle file to write (.tar)"),
        arg(
            "--normalization",
            type=Path,
            help="JSON with mean/std (9 each), or the exporter's model_config.json: the "
            "statistics the model was trained with (required, unless "
            "--normalization-from-calibration)",
        ),
        arg(
            "--normalization-from-calibration",
            action="store_true",
            help="derive mean/std from the calibration set instead, on purpose: right for the "
            "simulator and tests, wrong for a model trained on other data",
        ),
        arg(
            "--expires", metavar="WHEN", help=f"nodes refuse the bundle after this: {EXPIRES_HELP}"
        ),
        arg(
            "--calibration",
            type=Path,
            help="recorded windows: .npy (N,100,9), .npz (windows[, labels]) or .jsonl window "
            "messages (default: the simulator's activities, 384 windows)",
        ),
        arg("--description", default="", help="free text stored in the manifest"),
        arg("--sign-key", type=Path, help="fleet private key: sign the bundle"),
        arg(
            "--motif-labels",
            metavar="NAMES|FILE",
            help="names of the 12 motifs for dashboards, in index order: comma-separated "
            "(rest,walk,...) or a file with one per line; 1-32 characters each",
        ),
        arg("--hef", type=Path, help="compiled Hailo HEF of the same model"),
        arg(
            "--hef-arch",
            choices=["hailo8", "hailo8l"],
            default="hailo8",
            help="chip the HEF was compiled for (hailo8)",
        ),
    ],
    examples=[
        "imu-fleet bundle create --onnx encoder.onnx --name tcn-vae --version 1.2.0 \\\n"
        "      --normalization model_config.json --calibration recorded.npy \\\n"
        "      --motif-labels labels.txt --expires 180d --sign-key keys/fleet.key "
        "--out tcn-vae-1.2.0.tar",
    ],
)

COMMANDS = [
    Command(
        "bundle",
        "create or inspect model bundles",
        children=[
            CREATE,
            Command(
                "sign",
                "sign an existing bundle with the fleet key",
                _sign,
                args=[
                    arg("bundle", type=Path),
                    arg("--key", type=Path, required=True, help="private key (fleet.key)"),
                    arg("--out", type=Path, help="signed copy (default: sign in place)"),
                    arg(
                        "--expires",
                        metavar="WHEN",
                        help=f"set the expiry the signature covers: {EXPIRES_HELP}",
                    ),
                ],
                examples=[
                    "imu-fleet bundle sign tcn-vae-1.2.0.tar --key keys/fleet.key "
                    "--expires 2027-06-30"
                ],
            ),
            Command(
                "inspect",
                "verify a bundle and print its manifest",
                _inspect,
                args=[
                    arg("bundle", type=Path),
                    arg("--json", action="store_true", help="print the whole manifest as JSON"),
                    arg("--trust-key", type=Path, help="also verify the signature with this key"),
                ],
                examples=["imu-fleet bundle inspect tcn-vae-1.2.0.tar --trust-key keys/fleet.pub"],
            ),
            Command(
                "reference",
                "write the built-in reference bundle",
                _reference,
                args=[
                    arg("--out", type=Path, required=True),
                    arg("--version", default="1.0.0"),
                    arg("--seed", type=int, default=7, help="weights seed (7)"),
                    arg(
                        "--dynamic-batch",
                        action="store_true",
                        help="export with a dynamic batch dimension",
                    ),
                ],
                examples=["imu-fleet bundle reference --out tcn-reference-1.0.0.tar"],
            ),
        ],
    ),
    Command(
        "keys",
        "fleet signing keys",
        children=[
            Command(
                "generate",
                "write an Ed25519 key pair: fleet.key (private, 0600) and fleet.pub",
                _generate_keys,
                args=[
                    arg("--out", type=Path, required=True, help="folder for the two files"),
                    arg("--force", action="store_true", help="overwrite an existing pair"),
                ],
                examples=["imu-fleet keys generate --out keys/   # keep fleet.key offline"],
            )
        ],
    ),
]
"""The bundle and key commands of `imu-fleet`."""
