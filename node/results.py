"""Result messages: one JSON line per window on `imu/{sensor_id}/motifs` (QoS 1 by default).

A window that came from `POST /infer` gets the same result as its HTTP reply instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
from numpy.typing import NDArray

from node.metrics import NodeMetrics
from node.reporting import ErrorReporter
from node.work import WorkItem
from runtime.errors import BackendError
from runtime.pipeline import BatchResult, ModelPipeline
from schemas import SCHEMA_VERSION, topics
from schemas.codec import encode_dict
from schemas.messages import ErrorKind

Publisher = Callable[[str, bytes, "Callable[[], None] | None"], bool]
"""(topic, payload, on_safe): queue a QoS 1 message; False when it could not be queued."""


def result_message(
    item: WorkItem, *, node_id: str, model: dict[str, str], latent: NDArray[np.float32],
    scores: NDArray[np.float32], top: int, latency_ms: float,
) -> dict[str, Any]:  # fmt: skip
    """One window's result (schemas.messages.MotifResult's fields), ready for `encode_dict`."""
    return {
        "schema_version": SCHEMA_VERSION,
        "sensor_id": item.sensor_id,
        "node_id": node_id,
        "seq": item.seq,
        "t0": item.t0,
        "t1": item.t1,
        "model": model,
        "latent": latent,
        "motif_scores": scores,
        "top_motif": top,
        "latency_ms": round(latency_ms, 3),
        "ts": time.time(),
    }


class ResultPublisher:
    """Encodes a batch's results and queues them for the broker."""

    def __init__(
        self,
        node_id: str,
        publish: Publisher,
        metrics: NodeMetrics,
        *,
        reporter: ErrorReporter | None = None,
        unsent_reason: str = "outbox_full",
    ) -> None:
        self._node_id = node_id
        self._reporter = reporter
        self._publish = publish
        self._metrics = metrics
        self._unsent_reason = unsent_reason
        """The drop reason counted when `publish` refuses a result."""

    def __call__(self, batch: list[WorkItem], result: BatchResult, model: ModelPipeline) -> None:
        """Publish one result per window; counts latency and publication."""
        ref = {"name": model.ref.name, "version": model.ref.version}
        finite: NDArray[np.bool_] = np.asarray(
            np.isfinite(result.latent).all(axis=1) & np.isfinite(result.scores).all(axis=1)
        )
        if not finite.all():  # a model error, never published as null
            batch, result = self._refuse_non_finite(batch, result, finite, model)
        top = np.argmax(result.scores, axis=1)
        latencies: list[float] = []
        replies: list[tuple[Future[dict[str, Any]], dict[str, Any]]] = []
        published = 0
        for i, item in enumerate(batch):
            latency_ms = (time.perf_counter_ns() - item.received_ns) / 1e6
            message = result_message(
                item, node_id=self._node_id, model=ref, latent=result.latent[i],
                scores=result.scores[i], top=int(top[i]), latency_ms=latency_ms,
            )  # fmt: skip
            latencies.append(latency_ms)
            if item.reply is not None:
                replies.append((item.reply, message))
                continue
            if self._publish(topics.motifs(item.sensor_id), encode_dict(message), item.done):
                published += 1
            else:  # QoS 1: memory queue and disk spool full; QoS 0: no connection
                self._metrics.window_dropped(self._unsent_reason)
                if item.done is not None:
                    item.done()  # counted as dropped: its acknowledgement must not stay held
        self._metrics.batch_done(len(batch), latencies, published)
        for reply, message in replies:  # after counting: a caller may scrape /metrics next
            reply.set_result(message)

    def failed(self, batch: list[WorkItem], exc: Exception) -> None:
        """The model failed on a batch: each window is counted, reported (or its `/infer` caller
        gets the error) and acknowledged, not sent to the backend again forever."""
        for item in batch:
            self._metrics.window_dropped("inference_failed")
            if item.reply is not None:
                item.reply.set_exception(exc)
                continue
            if self._reporter is not None:
                self._reporter.report(
                    ErrorKind.INFERENCE,
                    f"backend failed on this window: {exc}",
                    sensor_id=item.sensor_id,
                    seq=item.seq,
                )
            if item.done is not None:
                item.done()

    def _refuse_non_finite(
        self,
        batch: list[WorkItem],
        result: BatchResult,
        finite: NDArray[np.bool_],
        model: ModelPipeline,
    ) -> tuple[list[WorkItem], BatchResult]:
        """Refuse the windows whose latent or scores are not finite; the rest go on."""
        reason = (
            f"{model.ref.name} {model.ref.version} returned a non-finite latent or motif score for "
            "this window: not published (the model is faulty for such input: roll back or fix it)"
        )
        for item, ok in zip(batch, finite, strict=True):
            if ok:
                continue
            self._metrics.window_dropped("model_output")
            if item.reply is not None:
                item.reply.set_exception(BackendError(reason))
                continue
            if self._reporter is not None:
                self._reporter.report(
                    ErrorKind.MODEL_OUTPUT, reason, sensor_id=item.sensor_id, seq=item.seq
                )
            if item.done is not None:
                item.done()
        kept = [item for item, ok in zip(batch, finite, strict=True) if ok]
        return kept, BatchResult(latent=result.latent[finite], scores=result.scores[finite])
