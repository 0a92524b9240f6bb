"""Ingest: what a broker's re-sent (DUP) messages do, and what a sensor's repeats do."""

from __future__ import annotations

import queue

import orjson
import paho.mqtt.client as mqtt
from test_windower import stream

from node.ingest.router import Ingest
from node.ingest.windower import SampleWindower
from node.metrics import NodeMetrics
from node.reporting import ErrorReporter
from node.work import WorkItem
from schemas import topics
from schemas.messages import ErrorKind


class Harness:
    """An Ingest with a real queue, windower, reporter and metrics; reports are kept."""

    def __init__(self, hop: int = 50) -> None:
        self.work: queue.Queue[WorkItem] = queue.Queue()
        self.metrics = NodeMetrics()
        self.reports: list[dict[str, object]] = []
        reporter = ErrorReporter("n1", self._publish, self.metrics, per_second=1000)
        self.ingest = Ingest(self.work, SampleWindower(hop), reporter, self.metrics)

    def _publish(self, topic: str, payload: bytes) -> bool:
        self.reports.append(orjson.loads(payload))
        return True

    def window(self, seq: int, *, dup: bool = False) -> None:
        message = mqtt.MQTTMessage(topic=topics.window("s1").encode())
        message.payload = orjson.dumps({"x": stream(100).tolist(), "seq": seq})
        message.dup = dup
        self.ingest.on_window(message)

    def samples(self, seq: int, n: int, *, dup: bool = False) -> None:
        message = mqtt.MQTTMessage(topic=topics.samples("s1").encode())
        message.payload = orjson.dumps({"samples": stream(n).tolist(), "seq": seq})
        message.dup = dup
        self.ingest.on_samples(message)

    def taken(self) -> list[int | None]:
        items = []
        while not self.work.empty():
            items.append(self.work.get_nowait().seq)
        return items

    def kinds(self) -> list[object]:
        return [r["kind"] for r in self.reports]


def test_a_resent_window_already_taken_is_skipped_and_counted() -> None:
    h = Harness()
    for seq in range(5):
        h.window(seq)
    h.window(3, dup=True)
    h.window(4, dup=True)
    h.window(5, dup=True)  # re-sent, but never reached us before: new
    h.window(6)
    assert h.taken() == [0, 1, 2, 3, 4, 5, 6]
    assert h.metrics.redelivered == 2
    assert h.metrics.totals()[3] == {}
    assert h.reports == []


def test_a_repeated_window_without_dup_is_still_a_sensor_reset() -> None:
    h = Harness()
    h.window(7)
    h.window(7)
    assert h.taken() == [7, 7]
    assert h.kinds() == [ErrorKind.SEQUENCE_RESET]


def test_a_resent_sample_run_already_taken_is_skipped() -> None:
    h = Harness(hop=50)
    h.samples(0, 60)
    h.samples(60, 60)  # completes window 0
    h.samples(60, 60, dup=True)
    h.samples(0, 60, dup=True)
    h.samples(120, 40)  # completes window 50
    assert h.taken() == [0, 50]
    assert h.metrics.redelivered == 2
    assert h.metrics.totals()[3] == {}
    assert h.reports == []


def test_a_resent_sample_run_past_the_stream_is_new() -> None:
    h = Harness(hop=100)
    h.samples(0, 60)
    h.samples(60, 40, dup=True)
    assert h.taken() == [0]
    assert h.metrics.totals()[3] == {}
    assert h.reports == []
