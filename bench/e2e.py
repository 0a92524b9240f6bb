"""End-to-end benchmark: windows through an MQTT broker and node processes, next to raw ONNX
Runtime on the same model, measured in the same run.

It starts mosquitto on a free loopback port (or uses --broker), builds the model's bundle (the
reference TCN, or --model: any ONNX file, bundled as `imu-fleet bundle create` does, or a bundle),
and runs, printing progress on stderr:
  1. raw ONNX Runtime on normalised windows, batch 1: 1 and 2 intra-op threads, and two threads
     each calling a 1-thread session at once (one shared session, and two); batch 8 when the
     model has a free batch dimension; measured before and again after the node phases;
  2. one node (`imu-node run`, its own process, default subscriptions):
     paced: JSON windows at --rate/s for --seconds: publish -> result latency p50/p95/p99;
     throughput: --burst windows over --sensors sensors, at most --outstanding in flight (QoS 1),
       once as JSON and once as binary frames: sustained windows/s, ratio to raw;
     sweep: JSON windows paced at fractions (--sweep) of that node's own JSON maximum, for
       --sweep-seconds each: the latency-against-rate curve (--plot draws it);
     flood (--flood N): N windows at QoS 0 as fast as one client publishes them;
  3. node groups (--groups 1,2,3): that many node processes in one --share-group (MQTT 5 shared
     subscriptions on window topics), each with its own node_id: throughput as above, the split
     between the nodes, windows lost or served twice;
  4. RSS (now and peak) of every node.
Ratios are node / raw, against the better of 1 and 2 intra-op threads ("best raw") and against
two parallel 1-thread calls, each the best of both raw passes. --json writes every figure;
--plot PATH writes a PNG (needs the `bench` extra: matplotlib).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import orjson

from bench.e2e_load import ENCODINGS, PROTOCOLS, Encoding, phase
from bench.e2e_nodes import SHARE_MODES, NodeGroup, NodeSettings
from bench.e2e_plot import PlotUnavailableError, plot_latency, require_matplotlib
from bench.e2e_raw import BenchModel, best_raw, model_from_path, raw_suite, reference_model
from bench.e2e_report import print_report, ratios
from fleet.simulate.imu_signals import calibration_set
from node.tools.local_broker import LocalBroker

EXAMPLES = """\
examples:
  python -m bench.e2e                                    # defaults, about 2-3 minutes
  python -m bench.e2e --json out.json --plot docs/img/e2e-latency.png
  python -m bench.e2e --model encoder.onnx --normalization model_config.json
  python -m bench.e2e --hidden 192 --groups 1,3 --workers 1    # ~1 ms per window, like a real TCN
  python -m bench.e2e --mqtt-protocol 3.1.1 --groups ''        # no shared subscriptions
  python -m bench.e2e --broker mqtt://10.0.0.5:1883            # an existing broker
"""


class Progress:
    """Phase lines on stderr with the elapsed time."""

    def __init__(self) -> None:
        """Start the clock."""
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        """One progress line."""
        print(f"[{time.monotonic() - self.start:6.1f} s] {message}", file=sys.stderr, flush=True)


def _fractions(value: str) -> list[float]:
    fractions = [float(part) for part in value.split(",") if part.strip()]
    if any(not 0 < f <= 2 for f in fractions):
        msg = f"sweep fractions must be in (0, 2]: {value}"
        raise argparse.ArgumentTypeError(msg)
    return fractions


def _counts(value: str) -> list[int]:
    counts = [int(part) for part in value.split(",") if part.strip()]
    if any(c < 1 for c in counts):
        msg = f"group sizes must be >= 1: {value}"
        raise argparse.ArgumentTypeError(msg)
    return counts


def _encodings(value: str) -> list[Encoding]:
    chosen = [part.strip() for part in value.split(",") if part.strip()]
    for name in chosen:
        if name not in ENCODINGS:
            msg = f"encodings are {', '.join(ENCODINGS)}: {value}"
            raise argparse.ArgumentTypeError(msg)
    return chosen  # type: ignore[return-value]  # checked just above


def parser() -> argparse.ArgumentParser:
    """The command line."""
    p = argparse.ArgumentParser(
        prog="python -m bench.e2e",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add(
        "--model",
        type=Path,
        help="an ONNX model ([1,100,9] in, [1,64] out) or a bundle (.tar); "
        "default: the reference TCN (--hidden)",
    )
    add(
        "--normalization",
        type=Path,
        help="with an ONNX --model: its mean/std JSON (the "
        "exporter's model_config.json); default: the simulator's (fine for timing)",
    )
    add(
        "--hidden",
        type=int,
        default=32,
        help="reference TCN channels per block (32; ~1 ms "
        "per window at 160-192, like the real encoder)",
    )
    add("--broker", help="an existing mqtt://host:port (default: start mosquitto on loopback)")
    add("--mqtt-protocol", choices=sorted(PROTOCOLS), default="5", help="nodes and bench (5)")
    add("--workers", default="auto", help="each node's workers setting (auto)")
    add(
        "--results-qos",
        type=int,
        choices=(0, 1),
        default=1,
        help="each node's results_qos setting (1)",
    )
    add("--raw-seconds", type=float, default=3.0, help="each raw ONNX Runtime figure (3)")
    add("--rate", type=float, default=200.0, help="paced phase windows/s (200)")
    add("--seconds", type=float, default=10.0, help="paced phase length (10)")
    add("--burst", type=int, default=4000, help="windows per throughput phase (4000)")
    add("--outstanding", type=int, default=64, help="throughput: windows in flight (64)")
    add("--sensors", type=int, default=12, help="sensors the load is spread over (12)")
    add("--encodings", type=_encodings, default=list(ENCODINGS), help="json,binary (both)")
    add(
        "--sweep",
        type=_fractions,
        default=[0.1, 0.25, 0.5, 0.65, 0.8, 0.9, 1.0],
        help="rate sweep: fractions of the node's JSON maximum (0.1,...,1.0; '' skips)",
    )
    add("--sweep-seconds", type=float, default=3.0, help="each sweep point (3)")
    add("--flood", type=int, default=0, help="flood phase windows at QoS 0 (0: skip)")
    add(
        "--groups",
        type=_counts,
        default=[1, 2, 3],
        help="node group sizes on one share group (1,2,3; '' skips)",
    )
    add(
        "--share-mode",
        choices=sorted(SHARE_MODES),
        default="window",
        help="how a group's nodes split the load: "
        + "; ".join(f"{name}: {mode.help}" for name, mode in SHARE_MODES.items()),
    )
    add("--json", type=Path, help="write every figure to this file")
    add("--plot", type=Path, help="write the latency-against-rate PNG here (bench extra)")
    return p


def _model(args: argparse.Namespace, tmp: Path) -> BenchModel:
    if args.model is not None:
        return model_from_path(args.model, tmp, args.normalization)
    return reference_model(tmp, args.hidden)


def run(args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Every phase; the report as a dict (see docs/performance.md)."""
    run_id = f"bench-{uuid.uuid4().hex[:6]}"
    windows, _ = calibration_set(32, seed=11)
    report: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "python": platform.python_version(),
            "onnxruntime": ort.__version__,
        },
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp_name:
        tmp = Path(tmp_name)
        progress("building the model bundle ...")
        model = _model(args, tmp)
        report["model"] = {"description": model.description, "bundle": model.bundle.name}
        progress(f"raw ONNX Runtime on {model.description}, {args.raw_seconds:g} s per figure ...")
        before = raw_suite(model, windows, args.raw_seconds)
        broker = None if args.broker else LocalBroker("mosquitto").start()
        try:
            url = args.broker or broker.url  # type: ignore[union-attr]
            settings = NodeSettings(
                url,
                model.bundle,
                str(args.workers),
                args.mqtt_protocol,
                tmp,
                extra=("--results-qos", str(args.results_qos)),
            )
            context = Context(args, settings, run_id, windows, progress)
            report["node"], report["sweep"] = _single_node(context)
            report["groups"] = [_group(context, size) for size in args.groups]
        finally:
            if broker is not None:
                broker.stop()
        progress("raw ONNX Runtime again (the yardstick is the better of the two passes) ...")
        after = raw_suite(model, windows, args.raw_seconds)
    report["raw"] = {"before": before, "after": after, **best_raw([before, after])}
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["ratios"] = ratios(report)
    return report


@dataclass(frozen=True)
class Context:
    """What every phase of one run shares."""

    args: argparse.Namespace
    settings: NodeSettings
    run_id: str
    windows: np.ndarray
    progress: Progress

    def phase(self, prefix: str, count: int, **options: Any) -> dict[str, Any]:
        """One load phase against this run's broker (sensor ids `{run_id}-{prefix}-...`)."""
        return phase(
            self.settings.broker,
            f"{self.run_id}-{prefix}",
            self.settings.protocol,
            self.windows,
            count,
            **options,
        )


def _single_node(run: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    args, progress = run.args, run.progress
    progress(f"starting one node (workers {args.workers}) ...")
    node: dict[str, Any] = {
        "workers": args.workers,
        "results_qos": args.results_qos,
        "throughput": {},
        "flood": {},
    }
    with NodeGroup(run.settings, [f"{run.run_id}-node"]) as group:
        group.wait_ready()
        node["rss_mb_after_start"] = group.rss_mb()[group.ids[0]]
        progress(f"paced: {args.rate:g} JSON windows/s for {args.seconds:g} s ...")
        count = max(1, int(args.rate * args.seconds))
        node["paced"] = run.phase("paced", count, sensors=1, rate=args.rate)
        for encoding in args.encodings:
            progress(f"throughput: {args.burst} {encoding} windows, {args.outstanding} in flight")
            node["throughput"][encoding] = run.phase(
                encoding,
                args.burst,
                sensors=args.sensors,
                encoding=encoding,
                outstanding=args.outstanding,
            )
        node_max = node["throughput"].get("json", {}).get("windows_per_s") or args.rate
        points = []
        for index, fraction in enumerate(args.sweep):
            rate = fraction * node_max
            progress(f"sweep {index + 1}/{len(args.sweep)}: {rate:.0f} JSON windows/s ...")
            count = max(10, int(rate * args.sweep_seconds))
            point = run.phase(f"sweep{index}", count, sensors=args.sensors, rate=rate)
            points.append({"fraction": fraction, **point})
        for encoding in args.encodings if args.flood else ():
            progress(f"flood: {args.flood} {encoding} windows at QoS 0 ...")
            node["flood"][encoding] = run.phase(
                f"flood-{encoding}",
                args.flood,
                sensors=args.sensors,
                encoding=encoding,
                outstanding=0,
                qos=0,
            )
        node["rss_mb"] = group.rss_mb()[group.ids[0]]
    return node, {"node_max_per_s": node_max, "points": points}


def _group(run: Context, size: int) -> dict[str, Any]:
    args, progress = run.args, run.progress
    share = f"{run.run_id}-g{size}"
    progress(f"starting {size} node(s) on share group {share} ({args.share_mode}) ...")
    ids = [f"{share}-n{i}" for i in range(size)]
    result: dict[str, Any] = {"nodes": size, "share_group": share, "mode": args.share_mode}
    topic = SHARE_MODES[args.share_mode].topic
    encodings = args.encodings if topic == "window" else ["json"]  # sample runs are JSON
    with NodeGroup(run.settings, ids, share=share, mode=args.share_mode) as group:
        group.wait_ready()
        result["throughput"] = {}
        for encoding in encodings:
            progress(f"{size} node(s): {args.burst} {encoding} windows ({topic}) ...")
            result["throughput"][encoding] = run.phase(
                f"g{size}-{encoding}",
                args.burst,
                sensors=args.sensors,
                encoding=encoding,
                outstanding=args.outstanding,
                topic=topic,
            )
        result["rss_mb"] = group.rss_mb()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the report, write --json and --plot."""
    args = parser().parse_args(argv)
    if args.plot is not None and not args.sweep:
        print("bench.e2e: --plot draws the rate sweep: give --sweep fractions", file=sys.stderr)
        return 2
    if args.plot is not None:
        try:
            require_matplotlib()
        except PlotUnavailableError as exc:
            print(f"bench.e2e: {exc}", file=sys.stderr)
            return 2
    progress = Progress()
    report = run(args, progress)
    print_report(report)
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
        progress(f"figures written to {args.json}")
    if args.plot:
        plot_latency(report, args.plot)
        progress(f"plot written to {args.plot} ({args.plot.stat().st_size / 1024:.0f} KiB)")
    progress("done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
