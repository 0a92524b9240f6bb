"""The inference worker: bounded queue in, micro-batches through the model, results out.

The worker takes whatever is queued (up to `max_batch`, waiting at most `batch_wait_s` for more),
runs it as one batch and hands the results to the publisher. The model reference is read once per
batch, so `swap` takes effect between two batches: no window is lost or run twice, and each result
names the model version that produced it.

When a batch fails, the worker asks its `recover` hook (node/inference/recovery.py) for a rebuilt
model and runs the same batch once more on it before giving the windows up as failed. While a
backend call runs, `busy_since` says since when: the watchdog (node/inference/watchdog.py) reads
it to find calls past their deadline.

Several workers can share one `ModelSlot` (node/inference/workers.py): each reads the slot once
per batch, so one swap of the slot reaches every worker at its next batch boundary.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from node.work import STOP, FailureSink, ResultSink, WorkItem
from runtime.backend import FloatArray
from runtime.errors import BackendError
from runtime.pipeline import BatchResult, ModelPipeline

logger = logging.getLogger(__name__)


Recover = Callable[[ModelPipeline, Exception, float], "ModelPipeline | None"]
"""Given the pipeline that failed, why, and when (monotonic) the failed call began: a rebuilt
pipeline to retry the batch on, or None."""


Serial = Callable[[ModelPipeline], AbstractContextManager[object]]
"""The context a backend call on a pipeline runs in (workers sharing a backend that takes one
call at a time hold a shared lock there)."""


def _no_recovery(_failed: ModelPipeline, _exc: Exception, _since: float) -> ModelPipeline | None:
    return None


def _concurrent(_pipeline: ModelPipeline) -> AbstractContextManager[object]:
    return contextlib.nullcontext()


class WorkSource(Protocol):
    """Where a worker takes its windows from: a `queue.Queue`, or one shard of a
    `ShardedQueue` (node/inference/workers.py)."""

    def get(self, block: bool = True, timeout: float | None = None) -> WorkItem:
        """The next window (blocking as `queue.Queue.get`)."""
        ...

    def get_nowait(self) -> WorkItem:
        """The next window, or `queue.Empty`."""
        ...

    def empty(self) -> bool:
        """True when nothing waits for this worker."""
        ...

    def put(self, item: WorkItem, block: bool = True, timeout: float | None = None) -> None:
        """Hand the worker an item (its stop sentinel)."""
        ...


class ModelSlot:
    """The model that serves, shared by the workers that read it once per batch."""

    def __init__(self, pipeline: ModelPipeline) -> None:
        self._pipeline = pipeline
        self._lock = threading.Lock()

    @property
    def pipeline(self) -> ModelPipeline:
        """The model currently serving."""
        with self._lock:
            return self._pipeline

    def swap(self, new: ModelPipeline) -> ModelPipeline:
        """Serve `new` from every worker's next batch on; returns the previous model (open)."""
        with self._lock:
            old, self._pipeline = self._pipeline, new
        return old

    def replace(self, expected: ModelPipeline, new: ModelPipeline) -> bool:
        """Serve `new` instead of `expected`, unless another swap came first (then False)."""
        with self._lock:
            if self._pipeline is not expected:
                return False
            self._pipeline = new
        return True


class InferenceWorker:
    """A named thread that drains the queue in micro-batches."""

    def __init__(
        self,
        pipeline: ModelPipeline | ModelSlot,
        work: WorkSource,
        on_results: ResultSink,
        on_failure: FailureSink,
        *,
        max_batch: int = 8,
        batch_wait_s: float = 0.0,
        recover: Recover = _no_recovery,
        name: str = "inference-worker",
        serial: Serial = _concurrent,
        on_served: Callable[[], None] = lambda: None,
    ) -> None:
        self._slot = pipeline if isinstance(pipeline, ModelSlot) else ModelSlot(pipeline)
        self._queue = work
        self._on_results = on_results
        self._on_failure = on_failure
        self._recover = recover
        self._on_served = on_served
        self._serial = serial
        self._max_batch = max_batch
        self._batch_wait_s = batch_wait_s
        self._busy_since: float | None = None
        self._busy_pipeline: ModelPipeline | None = None
        self._busy_lock = threading.Lock()
        self._busy_total_s = 0.0
        self.processed = 0
        """Windows this worker has finished or given up since start (the supervisor's progress)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def name(self) -> str:
        """The worker thread's name."""
        return self._thread.name

    @property
    def pipeline(self) -> ModelPipeline:
        """The model currently serving."""
        return self._slot.pipeline

    def is_alive(self) -> bool:
        """True while the worker thread runs."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def swap(self, new: ModelPipeline) -> ModelPipeline:
        """Serve `new` from the next batch on; returns the previous model (still open)."""
        return self._slot.swap(new)

    def replace(self, expected: ModelPipeline, new: ModelPipeline) -> bool:
        """Serve `new` instead of `expected`, unless another swap came first (then False)."""
        return self._slot.replace(expected, new)

    def busy(self) -> tuple[float, ModelPipeline] | None:
        """(`time.monotonic()` when the running backend call began, its pipeline), or None."""
        with self._busy_lock:
            if self._busy_since is None or self._busy_pipeline is None:
                return None
            return self._busy_since, self._busy_pipeline

    def busy_seconds(self) -> float:
        """Seconds spent in backend calls since start, the running one included."""
        with self._busy_lock:
            running = 0.0 if self._busy_since is None else time.monotonic() - self._busy_since
            return self._busy_total_s + running

    def stop(self, timeout: float) -> bool:
        """Finish what is queued, then stop; False if the queue did not drain in time."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.005)
        drained = self._queue.empty()
        self._stop.set()
        with contextlib.suppress(queue.Full):
            self._queue.put(STOP, timeout=max(deadline - time.monotonic(), 0.1))
        self._thread.join(max(deadline - time.monotonic(), 0.5))
        return drained and not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                self._process(batch)
                self.processed += len(batch)

    def _next_batch(self) -> list[WorkItem]:
        first = self._queue.get()
        if first is STOP:
            return []
        batch = [first]
        deadline = time.monotonic() + self._batch_wait_s
        while len(batch) < self._max_batch:
            try:
                remaining = deadline - time.monotonic()
                item = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is STOP:
                self._stop.set()
                break
            batch.append(item)
        return batch

    def _process(self, batch: list[WorkItem]) -> None:
        pipeline = self._slot.pipeline
        windows = np.stack([item.x for item in batch])
        started = time.monotonic()
        try:
            result = self._timed_run(pipeline, windows)
        except Exception as exc:
            self._log_failure(batch, exc)
            try:
                rebuilt = self._recover(pipeline, exc, started)
            except Exception:
                logger.exception("backend recovery raised")
                rebuilt = None
            if rebuilt is None:
                self._on_failure(batch, exc)
                return
            pipeline = rebuilt
            try:  # the same batch once more, on the rebuilt model
                result = self._timed_run(pipeline, windows)
            except Exception as again:
                self._log_failure(batch, again)
                self._on_failure(batch, again)
                return
        self._on_served()
        try:
            self._on_results(batch, result, pipeline)
        except Exception:  # the worker must outlive a bug or a full disk downstream
            logger.exception("publishing the results of a batch of %d failed", len(batch))

    def _timed_run(self, pipeline: ModelPipeline, windows: FloatArray) -> BatchResult:
        with self._serial(pipeline):  # waiting for a shared backend is not a running call
            with self._busy_lock:
                self._busy_since, self._busy_pipeline = time.monotonic(), pipeline
            try:
                return pipeline.run(windows)
            finally:
                with self._busy_lock:
                    if self._busy_since is not None:
                        self._busy_total_s += time.monotonic() - self._busy_since
                    self._busy_since = self._busy_pipeline = None

    @staticmethod
    def _log_failure(batch: list[WorkItem], exc: Exception) -> None:
        if isinstance(exc, BackendError):
            logger.error("inference failed on a batch of %d: %s", len(batch), exc)
        else:
            logger.error("unexpected failure on a batch of %d", len(batch), exc_info=exc)
