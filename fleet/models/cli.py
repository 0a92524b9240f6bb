"""`imu-fleet model validate|compile`: parity across backends, ONNX -> HEF."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.cli import Command, arg


def _validate(args: argparse.Namespace) -> int:
    from common.bundle import read_bundle  # noqa: PLC0415
    from fleet.bundles.calibration import load_calibration, simulated_calibration  # noqa: PLC0415
    from fleet.models.validate import format_table, validate_bundle  # noqa: PLC0415

    bundle = read_bundle(args.bundle)
    calib = load_calibration(args.calibration) if args.calibration else simulated_calibration(32)
    rows = validate_bundle(bundle, calib)
    print(format_table(rows, calib.source))
    ran = [row for row in rows if not row.status.startswith("skipped")]
    return 0 if ran and all(row.passed for row in ran) else 1


def _compile(args: argparse.Namespace) -> int:
    from common.bundle import read_bundle  # noqa: PLC0415
    from fleet.bundles.calibration import load_calibration  # noqa: PLC0415
    from fleet.compile import compile_bundle  # noqa: PLC0415

    report = compile_bundle(
        read_bundle(args.bundle),
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


COMMANDS = [
    Command(
        "model",
        "validate models across backends, compile HEFs",
        children=[
            Command(
                "validate",
                "parity table: every backend available here vs ONNX Runtime",
                _validate,
                description="Runs the bundle on every backend this machine has, on its golden "
                "windows and a calibration set, and prints cosine similarity and max error "
                "against ONNX Runtime. Bar: mean cosine >= 0.99 (float), >= 0.95 (quantised "
                "HEF). Exit 1 if a backend that ran misses its bar or its golden check.",
                args=[
                    arg("bundle", type=Path),
                    arg(
                        "--calibration",
                        type=Path,
                        help="windows file (.npy/.npz/.jsonl); default: simulator",
                    ),
                ],
                examples=["imu-fleet model validate tcn-vae-1.2.0.tar"],
            ),
            Command(
                "compile",
                "ONNX -> HEF with Hailo's Dataflow Compiler (x86-64 host, not the Pi)",
                _compile,
                description="Translates the bundle's ONNX, optimises (quantises) it on the "
                "calibration windows, checks the emulator against ONNX Runtime (native >= 0.99, "
                "quantised >= 0.95 mean cosine, and the node's own golden check), compiles, and "
                "writes a new bundle with both model.hef and model.onnx. Needs hailo_sdk_client "
                "(DFC 3.x).",
                args=[
                    arg("bundle", type=Path),
                    arg(
                        "--calibration",
                        type=Path,
                        required=True,
                        help="recorded windows (.jsonl[.gz] recording, .npy, .npz); Hailo "
                        "suggests >= 1024",
                    ),
                    arg("--hw-arch", choices=["hailo8", "hailo8l"], required=True),
                    arg("--out", type=Path, required=True, help="the new bundle"),
                    arg("--optimization-level", type=int, choices=range(5), default=None),
                ],
                examples=[
                    "imu-fleet model compile tcn-vae-1.2.0.tar --calibration rec.jsonl.gz "
                    "--hw-arch hailo8 --out tcn-vae-1.2.0-hailo8.tar"
                ],
            ),
        ],
    )
]
"""The model commands of `imu-fleet`."""
