"""Time to roll a version out to 100 and 1,000 simulated nodes.

Usage: `python -m bench.rollout [--counts 100,1000] [--waves 10,50,100]`

Each count gets its own mosquitto, a SimulatedFleet on the reference bundle (real MQTT clients
running the real model manager; inference shared per version), a published 1.1.0, and one
controller run: canary of 1, then the waves. Reported: connect time, time per wave, total time
and the fleet's final versions.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fleet.bundles.reference import build_reference_bundle
from fleet.distribution import publish_bundle
from fleet.rollout.controller import Controller
from fleet.simulate.nodes import SimulatedFleet, raise_open_files
from node.tools.local_broker import LocalBroker
from schemas.control import RolloutRecord


def one_run(count: int, waves: list[int], folder: Path) -> dict[str, object]:
    base = build_reference_bundle(folder / f"base-{count}.tar")
    new = build_reference_bundle(folder / f"new-{count}.tar", version="1.1.0", seed=8)
    with LocalBroker("mosquitto") as broker:
        publish_bundle(new, broker.url)
        fleet = SimulatedFleet(
            broker.url, base, count=count, cache_dir=folder / f"c{count}", telemetry_interval_s=10.0
        )
        started = time.monotonic()
        fleet.start(timeout_s=300)
        connected = time.monotonic() - started
        events: list[tuple[float, str]] = []

        def progress(record: RolloutRecord, event: str) -> None:
            events.append((time.monotonic(), event))

        controller = Controller.connect(broker.url, client_id="bench-ctl", progress=progress)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            views = [controller.view.get(n) for n in fleet.node_ids]
            if all(v is not None and v.model is not None and v.online for v in views):
                break
            time.sleep(0.2)
        time.sleep(0.5)
        began = time.monotonic()
        record = controller.start(
            "tcn-reference",
            "1.1.0",
            group=fleet.groups[0],
            canary=1,
            waves=waves,
            wave_timeout_s=600,
        )
        final = controller.run(record)
        total = time.monotonic() - began
        wave_times = [round(t - began, 2) for t, e in events if e.endswith("passed")]
        versions = fleet.versions()
        controller.close()
        fleet.stop()
    return {
        "nodes": count,
        "connect_s": round(connected, 1),
        "waves": [len(w) for w in record.waves],
        "wave_passed_at_s": wave_times,
        "rollout_s": round(total, 2),
        "state": str(final.state),
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the rollouts and print one line each."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.rollout",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--counts", default="100,1000")
    parser.add_argument("--waves", default="10,50,100")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    raise_open_files(max(counts) * 2 + 256)  # before mosquitto starts: it inherits the limit
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            result = one_run(count, [int(w) for w in args.waves.split(",")], Path(tmp))
            print(result, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
