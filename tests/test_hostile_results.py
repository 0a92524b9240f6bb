"""Results worth believing: a model's non-finite output is a model error, and retained windows
or results (left by anyone with write access) are neither served nor shown."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from test_dashboard_view import result as result_message
from test_node_e2e import raw_window

from common.bundle import read_bundle
from fleet.dashboard.view import DashboardView, Reject
from helpers.mqtt import Probe
from helpers.nodes import NodeFactory
from helpers.waiting import unique
from node.metrics import NodeMetrics
from node.reporting import ErrorReporter
from node.results import ResultPublisher
from node.work import WorkItem
from runtime.backend import BackendOptions
from runtime.errors import BackendError
from runtime.pipeline import BatchResult, load_model
from schemas import topics


def items(count: int, replies: bool = False) -> list[WorkItem]:
    return [
        WorkItem(f"s{i}", i, None, None, raw_window(i), 0, Future() if replies and i == 1 else None)
        for i in range(count)
    ]


def test_a_non_finite_latent_is_refused_counted_and_reported_never_published_as_null(
    reference_bundle_path: Path,
) -> None:
    """The red team's model passed its golden check but emitted +inf for some inputs, and the
    node published `"latent": [null, ...]`. Now each such window is a model error."""
    pipeline = load_model(read_bundle(reference_bundle_path), "onnx", BackendOptions())
    sent: list[tuple[str, dict[str, Any]]] = []
    metrics = NodeMetrics()

    def publish(topic: str, payload: bytes, on_safe: Any = None) -> bool:
        sent.append((topic, orjson.loads(payload)))
        if on_safe is not None:
            on_safe()
        return True

    reporter = ErrorReporter("n1", publish, metrics)
    publisher = ResultPublisher("n1", publish, metrics, reporter=reporter)
    batch = items(3, replies=True)
    good = pipeline.run(np.stack([item.x for item in batch]))
    latent = good.latent.copy()
    latent[0, 5] = np.inf  # window 0: an infinite latent
    scores = good.scores.copy()
    scores[1, 2] = np.nan  # window 1 (an /infer call): a NaN score
    publisher(batch, BatchResult(latent=latent, scores=scores), pipeline)
    results = [body for topic, body in sent if topic.endswith("/motifs")]
    errors = [body for topic, body in sent if topic.endswith("/errors")]
    assert [r["sensor_id"] for r in results] == ["s2"]  # only the finite window
    assert all(v is not None for v in results[0]["latent"])
    assert [(e["kind"], e["sensor_id"]) for e in errors] == [("model_output", "s0")]
    assert "non-finite" in errors[0]["reason"]
    assert batch[1].reply is not None
    with pytest.raises(BackendError, match="non-finite"):
        batch[1].reply.result(0)
    _, done, _, dropped, _ = metrics.totals()
    assert (done, dropped["model_output"]) == (1, 2)
    pipeline.close()


def test_a_retained_window_is_ignored_and_reported(start_node: NodeFactory, probe: Probe) -> None:
    """A sensor (or anyone who may write its topic) retained a window: every node that
    subscribes later would get it again and serve it again."""
    sensor = unique("retained")
    body = orjson.dumps({"x": raw_window(1).tolist(), "seq": 1})
    probe.publish(topics.window(sensor), body, retain=True)
    node_id = unique("node")
    probe.subscribe(topics.motifs(sensor), topics.node_errors(node_id))
    app = start_node(node_id=node_id)
    try:
        report = probe.wait_for(
            topics.node_errors(app.node_id), where=lambda m: m.json()["kind"] == "retained_input"
        )[0].json()
        assert report["sensor_id"] == sensor
        probe.publish(topics.window(sensor), orjson.dumps({"x": raw_window(2).tolist(), "seq": 2}))
        served = probe.wait_for(topics.motifs(sensor))
        assert [m.json()["seq"] for m in served] == [2]  # the retained one never ran
        assert app.metrics.totals()[3]["retained"] == 1
    finally:
        probe.publish(topics.window(sensor), b"", retain=True)


def test_the_dashboard_never_shows_a_retained_result() -> None:
    view = DashboardView()
    message = result_message("s1", "n1", 3)
    assert view.ingest(topics.motifs("s1"), message, retained=True) is Reject.RETAINED
    assert view.snapshot()["sensors"] == []
    assert view.ingest(topics.motifs("s1"), message) is None
    assert len(view.snapshot()["sensors"]) == 1
