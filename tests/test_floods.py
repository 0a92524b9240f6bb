"""Bursts and hostile floods: good sensors keep being served, and every refusal is counted.

Each test prints what it measured (docs/reliability.md).
"""

from __future__ import annotations

import threading
import time

import orjson
import pytest
from test_node_e2e import raw_window

from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.waiting import unique
from node.tools.local_broker import LocalBroker
from schemas import topics

pytestmark = pytest.mark.parametrize("backend", ["onnx"], indirect=True)


def payloads(count: int) -> list[bytes]:
    rows = [orjson.dumps(raw_window(i).tolist()) for i in range(8)]
    return [b'{"x":' + rows[s % 8] + b',"seq":' + str(s).encode() + b"}" for s in range(count)]


def test_a_burst_ten_times_the_rate_is_served_whole(start_node: NodeFactory, probe: Probe) -> None:
    """1,500 windows at once (ten seconds of a 150 windows/s sensor) into a 512-slot queue: the
    full queue holds the network thread back and the broker keeps the rest; nothing is dropped."""
    app = start_node()
    sensor = unique("burst")
    probe.subscribe(topics.motifs(sensor))
    started = time.monotonic()
    for payload in payloads(1500):
        probe.client.publish(topics.window(sensor), payload, qos=1)
    results = probe.wait_for(topics.motifs(sensor), 1500, timeout=60)
    took = time.monotonic() - started
    seqs = {m.json()["seq"] for m in results}
    print(f"\nburst of 1,500 windows: all {len(seqs)} served in {took:.2f} s; dropped "
          f"{app.metrics.totals()[3]}")  # fmt: skip
    assert seqs == set(range(1500))
    assert app.metrics.totals()[3] == {}


def test_a_hostile_flood_beside_a_good_sensor(
    start_node: NodeFactory, probe: Probe, broker: LocalBroker
) -> None:
    """10,000 junk payloads as fast as they go (QoS 0) while a good sensor sends 300 windows at
    100 windows/s (QoS 1): every good window is served; every junk one is refused and counted."""
    app = start_node()
    good, evil = unique("good"), unique("evil")
    probe.subscribe(topics.motifs(good))
    attacker = Probe(broker.url)
    junk = [b"{" * 50, b'{"x": [[1, 2]]}', b"\xff" * 3601, b'{"x": "nope", "seq": -1}']
    done = threading.Event()

    def flood() -> None:
        for i in range(10_000):
            attacker.client.publish(topics.window(evil), junk[i % len(junk)], qos=0)
        attacker.client.publish(topics.window(evil), b"!", qos=1).wait_for_publish(30)
        done.set()

    started = time.monotonic()
    threading.Thread(target=flood, daemon=True).start()
    for seq, payload in enumerate(payloads(300)):
        delay = started + seq / 100 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        probe.client.publish(topics.window(good), payload, qos=1)
    assert done.wait(60)
    results = probe.wait_for(topics.motifs(good), 300, timeout=60)
    took = time.monotonic() - started
    latencies = sorted(m.json()["latency_ms"] for m in results)
    _, _, _, dropped, errors = app.metrics.totals()
    refused = sum(errors.get(kind, 0) for kind in ("malformed", "invalid", "non_finite"))
    print(f"\nflood: 10,001 junk payloads beside 300 good windows in {took:.1f} s: good served "
          f"{len({m.json()['seq'] for m in results})}/300, p95 {latencies[284]:.1f} ms, junk "
          f"refused and counted {refused}, dropped {dropped}")  # fmt: skip
    assert {m.json()["seq"] for m in results} == set(range(300))
    assert dropped == {}
    attacker.close()
