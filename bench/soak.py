"""Memory soak: one node windowing many sensors' `samples` for minutes; its RSS over time.

Starts mosquitto on a free loopback port, one node (`imu-node run`, its own process) and
`imu-fleet simulate sensors --mode samples` (its own process), samples the node's RSS every
`--every` seconds, and prints the series, the peak and the growth over the second half of the
run (allocations settle in the first). Results are counted from the broker, so the rate the node
kept up with is printed beside the rate offered.

  python -m bench.soak                                   # 1,000 sensors, 10 minutes
  python -m bench.soak --sensors 200 --minutes 1         # a quick look
  python -m bench.soak --share 3                         # three nodes in one share group
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from bench.e2e import Progress
from bench.e2e_load import client
from bench.e2e_nodes import NodeGroup, NodeSettings, peak_rss_mb
from bench.e2e_raw import reference_model
from node.tools.local_broker import LocalBroker
from schemas import topics


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sensors", type=int, default=1000, help="simulated sensors (1000)")
    parser.add_argument("--rate", type=float, default=10.0, help="samples/s per sensor (10)")
    parser.add_argument("--interval", type=float, default=1.0, help="s between runs (1)")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length (10)")
    parser.add_argument("--every", type=float, default=30.0, help="s between RSS samples (30)")
    parser.add_argument(
        "--share", type=int, default=0, help="nodes in one share group (0: one node, no group)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser.parse_args(argv)


def _report(args: argparse.Namespace, ids: list[str], series: list[dict[str, Any]]) -> None:
    """Print (and with --json write) the peak and the second half's growth per node."""
    half = [p for p in series if p["s"] >= series[-1]["s"] / 2]
    report: dict[str, Any] = {"args": vars(args) | {"json": None}, "series": series}
    for node_id in ids:
        first, last = half[0]["rss"][node_id]["rss"], half[-1]["rss"][node_id]["rss"]
        peak = max(p["rss"][node_id]["peak"] for p in series)
        minutes = (half[-1]["s"] - half[0]["s"]) / 60 or 1
        growth = (last - first) / minutes
        report[node_id] = {"peak_mb": peak, "second_half_growth_mb_per_min": growth}
        print(
            f"{node_id}: peak RSS {peak:.1f} MiB; second half {first:.1f} -> {last:.1f} MiB "
            f"({growth:+.2f} MiB/min)"
        )
    per_sensor = max(0, int((args.rate * series[-1]["s"] - 100) // 50) + 1)
    print(
        f"results {series[-1]['results']} (about {args.sensors * per_sensor} windows offered at "
        "hop 50)"
    )
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))


def main(argv: list[str] | None = None) -> int:
    """Run the soak; prints the RSS series."""
    args = _parse(argv)
    progress = Progress()
    results = 0
    lock = threading.Lock()

    def count(*_: Any) -> None:
        nonlocal results
        with lock:
            results += 1

    with tempfile.TemporaryDirectory(prefix="imu-soak-") as tmp_name, LocalBroker() as broker:
        tmp = Path(tmp_name)
        progress("building the reference bundle ...")
        model = reference_model(tmp, 32)
        settings = NodeSettings(broker.url, model.bundle, "auto", "5", tmp)
        size = max(1, args.share)
        ids = [f"soak-n{i}" for i in range(size)]
        listener = client(broker.url, "soak-listener", "5")
        listener.on_message = count
        listener.subscribe(topics.MOTIFS_FILTER, qos=0)
        listener.loop_start()
        # a share group divides `samples` by sensor (the same node options as for windows)
        with NodeGroup(settings, ids, share="soak" if args.share else None) as group:
            group.wait_ready()
            progress(f"{size} node(s) up; {args.sensors} sensors, {args.minutes:g} min")
            sensors = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fleet.cli",
                    "simulate",
                    "sensors",
                    "--broker",
                    broker.url,
                    "--sensors",
                    str(args.sensors),
                    "--rate",
                    str(args.rate),
                    "--interval",
                    str(args.interval),
                    "--mode",
                    "samples",
                    "--duration",
                    str(args.minutes * 60),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            series: list[dict[str, Any]] = []
            t0 = time.monotonic()
            end = t0 + args.minutes * 60
            while True:
                time.sleep(max(0.0, min(args.every, end - time.monotonic())))
                elapsed = time.monotonic() - t0
                rss = {n: peak_rss_mb(p.pid) for n, p in zip(ids, group.processes, strict=True)}
                with lock:
                    served = results
                series.append({"s": round(elapsed, 1), "results": served, "rss": rss})
                now = ", ".join(f"{v['rss']:.0f}" for v in rss.values())
                progress(f"{elapsed:6.0f} s: RSS {now} MiB, {served} results")
                if time.monotonic() >= end:
                    break
            sensors.wait(30)
        listener.loop_stop()
    _report(args, ids, series)
    return 0


if __name__ == "__main__":
    sys.exit(main())
