"""A rollout to 10,000 simulated nodes across 4 site brokers bridged to one fleet broker.

Usage: `python -m bench.sites [--nodes 10000] [--sites 4] [--telemetry-interval 10] [--soak 10]`

A soak must span a telemetry interval (the controller refuses a shorter one): a 2 s soak needs
2 s telemetry, 5,000 messages a second from 10,000 nodes, more than 2 cores of simulators carry.

Every part is a process of its own on this machine:

- the fleet broker, on compose/mosquitto-secure.conf (TLS, client certificates, the ACL that
  `imu-fleet pki` wrote, with one block per site bridge);
- per site, a mosquitto with the `connection` block `imu-fleet pki bridge --nodes-file` wrote
  (TLS to the fleet broker, the site's nodes' topics), and `imu-fleet simulate nodes --site`
  with that site's nodes (`SITE-0000`, ...) on it;
- this process: the rollout controller, logged in on the fleet broker as `fleet-rollout` with
  its certificate, exactly as `imu-fleet rollout` is.

Version 1.1.0 is published once on the fleet broker; its chunks cross each bridge once. The
rollout waves by site (`--by-site`): a canary in the first site, the rest of that site, then
one wave per other site, each wave soaking `--soak` s behind health gates.

Printed: one JSON line per phase while it runs, then the result: time for the nodes to connect
and for the controller to see them all through the bridges; the rollout's time to done and when
each wave passed; each process's CPU seconds over the rollout and its peak RSS; and the final
versions the nodes reported, per site.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.cpu import cpu_s
from bench.e2e_nodes import peak_rss_mb
from common.logs import JsonLineFormatter
from common.mqtt.address import BrokerAddress
from common.mqtt.connection import Connection, Credentials
from fleet import pki
from fleet.bundles.reference import build_reference_bundle
from fleet.distribution import publish_bundle
from fleet.pki.local_brokers import fleet_broker_conf, site_broker_conf
from fleet.pki.login import client_login
from fleet.rollout.controller import Controller
from fleet.simulate.nodes import raise_open_files
from node.tools.local_broker import free_port, wait_for_port
from schemas.codec import encode
from schemas.control import RolloutRecord

ROOT = Path(__file__).resolve().parents[1]
SECURE_CONF = ROOT / "compose" / "mosquitto-secure.conf"
CONTROLLER = "fleet-rollout"


@dataclass
class Proc:
    """One process of the bench: what it is, and its CPU seconds when the rollout began."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    cpu_at_start: float = 0.0

    def cpu(self) -> float:
        return cpu_s(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Bench:
    """Everything one run started, in start order (stopped in reverse)."""

    folder: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str]) -> Proc:
        log = self.folder / f"{name}.log"
        with log.open("ab") as sink:
            process = subprocess.Popen(argv, stdout=sink, stderr=sink)
        proc = Proc(name, process, log)
        self.procs.append(proc)
        return proc

    def broker(self, name: str, conf: Path, port: int) -> Proc:
        proc = self.spawn(name, ["mosquitto", "-c", str(conf)])
        try:
            wait_for_port(port, 20)
        except TimeoutError as exc:
            msg = f"{name} did not start:\n{proc.log.read_text()[-2000:]}"
            raise RuntimeError(msg) from exc
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


def say(**fields: Any) -> None:
    print(orjson.dumps(fields).decode(), flush=True)


def site_names(count: int) -> list[str]:
    return [f"site-{chr(ord('a') + i)}" for i in range(count)]


def split(total: int, parts: int) -> list[int]:
    """`total` nodes over `parts` sites, as evenly as they go."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def fleet_login(layout: pki.Layout, port: int, username: str) -> Connection:
    """`username` on the fleet broker with the certificate `imu-fleet pki` made for it."""
    broker = Connection(BrokerAddress.parse(f"mqtts://localhost:{port}"),
                        credentials=Credentials(ca_file=str(layout.ca_cert)))  # fmt: skip
    return client_login(broker, username, layout.clients)


def start_brokers(
    bench: Bench, sites: dict[str, int], layout: pki.Layout, max_packet: int
) -> tuple[int, dict[str, int]]:
    """The fleet broker (its `max_packet_size` set to `max_packet`: a rollout record names
    every node) and one bridged broker per site; returns their client ports."""
    folder = bench.folder
    ports = {"8883": free_port(), "8884": free_port(), "1883": free_port()}
    for site, count in sites.items():
        nodes = folder / f"{site}.nodes"
        nodes.write_text("".join(f"{site}-{i:04d}\n" for i in range(count)))
        kit = str(folder / f"{site}-kit")
        fleet_host = f"localhost:{ports['8883']}"
        argv = ["bridge", str(layout.root), site, "--nodes-file", str(nodes),
                "--fleet-host", fleet_host, "--out", kit, "--files-dir", kit]  # fmt: skip
        if pki.main(argv) != 0:
            msg = f"imu-fleet pki {' '.join(argv)} failed"
            raise RuntimeError(msg)
    (folder / "fleet-data").mkdir()
    conf = folder / "fleet.conf"
    shipped = fleet_broker_conf(SECURE_CONF.read_text(), ports, layout, folder / "fleet-data")
    conf.write_text(re.sub(r"(?m)^max_packet_size .*$", f"max_packet_size {max_packet}", shipped))
    bench.broker("fleet-broker", conf, ports["8883"])
    site_ports: dict[str, int] = {}
    for site in sites:
        port, data = free_port(), folder / f"{site}-data"
        data.mkdir()
        block = (folder / f"{site}-kit" / f"bridge-{site}.conf").read_text()
        (folder / f"{site}.conf").write_text(
            site_broker_conf(port, data, block, SECURE_CONF.read_text())
        )
        bench.broker(f"{site}-broker", folder / f"{site}.conf", port)
        site_ports[site] = port
    return ports["8883"], site_ports


def wait_for_nodes(controller: Controller, sites: dict[str, int], timeout_s: float) -> float:
    """Until the controller sees every node online, on a model, at its site: seconds taken."""
    began, expected = time.monotonic(), sum(sites.values())
    last = -1
    while True:
        seen = [v for v in controller.view.nodes() if v.online and v.model is not None and v.site]
        if len(seen) >= expected:
            return time.monotonic() - began
        if len(seen) != last and int(time.monotonic() - began) % 5 == 0:
            say(phase="seeing nodes", seen=len(seen), of=expected)
            last = len(seen)
        if time.monotonic() - began > timeout_s:
            msg = f"the controller saw {len(seen)} of {expected} nodes after {timeout_s:g} s"
            raise TimeoutError(msg)
        time.sleep(0.5)


def run(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    log = logging.FileHandler(folder / "controller.log")  # the controller's own log
    log.setFormatter(JsonLineFormatter())
    logging.getLogger().addHandler(log)
    logging.getLogger().setLevel(logging.INFO)
    sites = dict(zip(site_names(args.sites), split(args.nodes, args.sites), strict=True))
    raise_open_files(max(sites.values()) + 512)  # before the brokers start: they inherit it
    layout = pki.Layout(folder / "fleet-site")
    pki.init_site(layout.root, site="fleet", hosts=("localhost", "127.0.0.1"))
    pki.add_client(layout.root, "fleet", "rollout")
    base = build_reference_bundle(folder / "base.tar")
    new = build_reference_bundle(folder / "new.tar", version="1.1.0", seed=8)
    bench = Bench(folder)
    try:
        fleet_port, site_ports = start_brokers(bench, sites, layout, args.fleet_max_packet)
        say(phase="brokers up", sites=len(sites), nodes=sum(sites.values()))
        login = fleet_login(layout, fleet_port, CONTROLLER)
        publish_bundle(new, login)
        started = time.monotonic()
        for site, count in sites.items():
            bench.spawn(f"{site}-nodes", [
                sys.executable, "-m", "fleet.cli", "simulate", "nodes",
                "--broker", f"mqtt://127.0.0.1:{site_ports[site]}", "--count", str(count),
                "--bundle", str(base), "--prefix", site, "--site", site,
                "--telemetry-interval", str(args.telemetry_interval), "--give-up-after", "0",
            ])  # fmt: skip
        events: list[tuple[float, str]] = []
        began = time.monotonic()  # again when the rollout starts

        def progress(record: RolloutRecord, event: str) -> None:
            events.append((time.monotonic(), event))
            if "passed" in event or "wave" not in event or "soak over" in event:
                say(phase="rollout", at_s=round(time.monotonic() - began, 2), event=event)

        controller = Controller.connect(login, client_id=CONTROLLER, progress=progress)
        seen_s = wait_for_nodes(controller, sites, args.connect_timeout)
        say(phase="all nodes seen", after_s=round(time.monotonic() - started, 1))
        for proc in bench.procs:
            proc.cpu_at_start = proc.cpu()
        own_cpu = cpu_s()
        began, wall_began = time.monotonic(), time.time()
        record = controller.start(
            "tcn-reference",
            "1.1.0",
            canary=args.canary,
            by_site=True,
            gates=controller.default_gates(soak_s=args.soak),
            wave_timeout_s=args.wave_timeout,
        )
        final = controller.run(record)
        total = time.monotonic() - began
        own_cpu = cpu_s() - own_cpu
        processes = {
            proc.name: {
                "cpu_s": round(proc.cpu() - proc.cpu_at_start, 1),
                "peak_rss_mb": round(peak_rss_mb(proc.process.pid)["peak"], 1),
            }
            for proc in bench.procs
        }
        for node_id in [n for n, o in final.nodes.items() if o.failed][:3]:
            view = controller.view.get(node_id)
            history = list(view.history) if view else []
            reports = [(round(t.ts - wall_began, 2), t.interval_s) for t in history]
            say(failed=node_id, reports=reports)
        processes["controller"] = {
            "cpu_s": round(own_cpu, 1),
            "peak_rss_mb": round(peak_rss_mb(os.getpid())["peak"], 1),
        }
        time.sleep(1.0)  # the last wave's model reports
        versions: dict[str, Counter[str]] = {site: Counter() for site in sites}
        for view in controller.view.nodes():
            if view.site in versions and view.model is not None and view.model.active:
                versions[view.site][view.model.active.version] += 1
        controller.close()
        return {
            "nodes": sum(sites.values()),
            "sites": sites,
            "telemetry_interval_s": args.telemetry_interval,
            "soak_s": args.soak,
            "all_seen_after_s": round(seen_s, 1),
            "waves": [len(w) for w in record.waves],
            "wave_passed_at_s": [round(t - began, 2) for t, e in events if e.endswith("passed")],
            "rollout_s": round(total, 2),
            "state": str(final.state),
            "record_bytes": len(encode(final)),
            "failed": {
                n: o.error or (o.health and o.health.reason)
                for n, o in final.nodes.items()
                if o.failed
            },
            "processes": processes,
            "versions": {site: dict(counts) for site, counts in versions.items()},
        }
    finally:
        bench.stop()


def main(argv: list[str] | None = None) -> int:
    """Run one bench and print its result as a JSON line; 1 when the rollout did not succeed."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.sites",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=10_000, help="simulated nodes in all (10000)")
    parser.add_argument("--sites", type=int, default=4, help="site brokers (4)")
    parser.add_argument(
        "--telemetry-interval", type=float, default=10.0, help="s between a node's telemetry (10)"
    )
    parser.add_argument(
        "--soak", type=float, default=10.0, help="s each wave soaks, one interval or more (10)"
    )
    parser.add_argument("--canary", type=int, default=1, help="canary nodes (1)")
    parser.add_argument("--wave-timeout", type=float, default=300.0, help="s per wave (300)")
    parser.add_argument(
        "--connect-timeout", type=float, default=600.0, help="s for every node to be seen (600)"
    )
    parser.add_argument(
        "--fleet-max-packet",
        type=int,
        default=16_000_000,
        help="the fleet broker's max_packet_size: the rollout record must fit (16000000)",
    )
    parser.add_argument("--keep", type=Path, help="keep the brokers' files and logs here")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-sites-") as tmp:
            result = run(args, Path(tmp))
    say(result=result)
    return 0 if result["state"] == "succeeded" else 1  # the figures of a failed one still count


if __name__ == "__main__":
    raise SystemExit(main())
