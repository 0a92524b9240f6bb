"""The envelope a window travels in from ingest to the workers, and where the workers hand it on.

Ingest (node/ingest/) and `POST /infer` (node/api/) put `WorkItem`s on the bounded queue; the
workers (node/inference/) take them in micro-batches and hand each batch to a `ResultSink` (the
result publisher, node/results.py) or, when the model failed, to a `FailureSink`. `done` is the
sensor message's acknowledgement (node/ingest/acks.py), released once the window's fate is safe.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.backend import FloatArray
from runtime.pipeline import BatchResult, ModelPipeline


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One window waiting for inference."""

    sensor_id: str
    seq: int | None
    t0: float | None
    t1: float | None
    x: FloatArray
    received_ns: int
    """`time.perf_counter_ns()` when the message arrived."""
    reply: Future[dict[str, Any]] | None = None
    """Set for a window from `POST /infer`: the result goes here instead of to MQTT."""
    done: Callable[[], None] | None = None
    """Called once the window's fate is safe: its result acknowledged by the broker or on disk,
    or its failure reported. Releases the sensor message's acknowledgement (node/ingest/acks.py)."""


STOP = WorkItem("", None, None, None, np.empty((0, 0), np.float32), 0)
"""Sentinel that wakes the worker for shutdown."""

ResultSink = Callable[[list[WorkItem], BatchResult, ModelPipeline], None]
FailureSink = Callable[[list[WorkItem], Exception], None]
