"""N inference workers behind one bounded queue: each sensor pinned to one worker.

ONNX Runtime releases the GIL while it computes, so two worker threads each driving a one-thread
session use two cores where one worker with two intra-op threads cannot (docs/performance.md,
"Parallel workers"). The pool keeps what one worker guaranteed:

- **Order per sensor.** `ShardedQueue` is one `queue.Queue` (one capacity, `queue_size`, and the
  same blocking `put` with its timeout: ingest's full-queue behaviour is unchanged) whose items
  wait in one FIFO shard per worker. A window goes to shard `crc32(sensor_id) % N`, so all of a
  sensor's windows are served by one worker, in arrival order. `POST /infer` windows (they carry
  a reply future and no order between requests) go to the shortest shard.
- **One model, one switch point.** The workers share one `ModelSlot` and one pipeline (ONNX
  Runtime sessions are thread-safe for `run`). A swap is one reference change; every worker reads
  the slot once per batch, so each batch runs whole on one version, and a sensor (one worker,
  FIFO) sees every window before the swap on the old model and every one after on the new.
- **Failures.** Recovery calls are serialised (one rebuild; a worker whose call failed meanwhile
  retries on the rebuilt pipeline); the watchdog sees the oldest running call of any worker; the
  supervisor watches every worker thread and each worker's progress. A backend other than ONNX
  Runtime (a hot swap can bring a Hailo model to a node started on ONNX) is called by one worker
  at a time.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Literal

from node.inference.worker import InferenceWorker, ModelSlot, Recover, _no_recovery
from node.supervisor import Supervisor, Watched
from node.work import STOP, FailureSink, ResultSink, WorkItem
from runtime.pipeline import ModelPipeline
from runtime.registry import shares_session

logger = logging.getLogger(__name__)

MAX_AUTO_WORKERS = 4
"""`workers = "auto"` uses at most this many (one per CPU core below it)."""

WorkersSetting = int | Literal["auto"]


def resolve_workers(
    setting: WorkersSetting, backend: str, threads: int, cpus: int | None = None
) -> int:
    """How many workers serve: `auto` is one per core (at most 4, and `threads` cores each) on
    ONNX Runtime, and 1 on an accelerator, whose backend keeps its own jobs in flight."""
    if not shares_session(backend):
        if setting != "auto" and setting > 1:
            logger.warning(
                "workers = %d ignored: the %s backend is driven by one worker (it keeps its own "
                "jobs in flight)",
                setting,
                backend,
            )
        return 1
    if setting == "auto":
        cores = cpus if cpus is not None else (os.cpu_count() or 1)
        return max(1, min(cores, MAX_AUTO_WORKERS) // max(threads, 1))
    return setting


def shard_of(sensor_id: str, shards: int) -> int:
    """The worker a sensor is pinned to: stable across processes (not Python's salted hash)."""
    return zlib.crc32(sensor_id.encode()) % shards


class ShardedQueue(queue.Queue[WorkItem]):
    """A bounded queue whose items wait in one FIFO shard per worker.

    `put`, `put_nowait`, `qsize`, `full`, `empty` and `maxsize` are `queue.Queue`'s, over the
    total; each worker takes from its own shard (`shard(i)`)."""

    def __init__(self, maxsize: int, shards: int) -> None:
        if shards < 1:
            msg = f"a sharded queue needs at least one shard, not {shards}"
            raise ValueError(msg)
        self._shard_count = shards
        super().__init__(maxsize)  # calls _init
        self._ready = [threading.Condition(self.mutex) for _ in range(shards)]

    def shard(self, index: int) -> Shard:
        """Worker `index`'s view."""
        return Shard(self, index)

    def shard_sizes(self) -> list[int]:
        """Windows waiting per shard."""
        with self.mutex:
            return [sum(item is not STOP for item in shard) for shard in self._shards]

    def shard_size(self, index: int) -> int:
        """Windows waiting in one shard."""
        with self.mutex:
            return sum(item is not STOP for item in self._shards[index])

    def get_from(self, index: int, block: bool = True, timeout: float | None = None) -> WorkItem:
        """The oldest item of shard `index` (blocking as `queue.Queue.get`)."""
        shard, ready = self._shards[index], self._ready[index]
        with ready:
            if not block:
                if not shard:
                    raise queue.Empty
            elif timeout is None:
                while not shard:
                    ready.wait()
            elif timeout < 0:
                msg = "'timeout' must be a non-negative number"
                raise ValueError(msg)
            else:
                end = time.monotonic() + timeout
                while not shard:
                    remaining = end - time.monotonic()
                    if remaining <= 0:
                        raise queue.Empty
                    ready.wait(remaining)
            item = shard.popleft()
            if item is not STOP:
                self._count -= 1
                self.not_full.notify()
            return item

    def wake(self, index: int, item: WorkItem) -> None:
        """Put `item` (a worker's stop sentinel) in shard `index`, past the capacity."""
        with self._ready[index]:
            self._shards[index].append(item)
            self._ready[index].notify()

    # -- queue.Queue's storage hooks (called with self.mutex held) -----------------------------

    def _init(self, maxsize: int) -> None:
        self._shards: list[deque[WorkItem]] = [deque() for _ in range(self._shard_count)]
        self._count = 0

    def _qsize(self) -> int:
        return self._count

    def _put(self, item: WorkItem) -> None:
        if item.reply is not None:  # POST /infer: no order to keep, the shortest shard
            index = min(range(self._shard_count), key=lambda i: len(self._shards[i]))
        else:
            index = shard_of(item.sensor_id, self._shard_count)
        self._shards[index].append(item)
        self._count += 1
        self._ready[index].notify()

    def _get(self) -> WorkItem:  # queue.Queue.get (not a worker): the fullest shard
        shard = max(self._shards, key=len)
        item = shard.popleft()
        if item is not STOP:
            self._count -= 1
        return item


class Shard:
    """One worker's side of a `ShardedQueue` (a `WorkSource`)."""

    def __init__(self, work: ShardedQueue, index: int) -> None:
        self._work = work
        self._index = index

    def get(self, block: bool = True, timeout: float | None = None) -> WorkItem:
        """The next window for this worker."""
        return self._work.get_from(self._index, block, timeout)

    def get_nowait(self) -> WorkItem:
        """The next window for this worker, or `queue.Empty`."""
        return self._work.get_from(self._index, block=False)

    def empty(self) -> bool:
        """True when no window waits for this worker."""
        return self._work.shard_size(self._index) == 0

    def qsize(self) -> int:
        """Windows waiting for this worker."""
        return self._work.shard_size(self._index)

    def put(self, item: WorkItem, block: bool = True, timeout: float | None = None) -> None:
        """The worker's stop sentinel: never refused, never counted against the capacity."""
        del block, timeout
        self._work.wake(self._index, item)


class WorkerPool:
    """`count` inference workers sharing one queue and one model; the node's `worker`.

    With one worker this is exactly the single worker of before: a plain `queue.Queue` and one
    thread named `inference-worker`."""

    def __init__(
        self,
        pipeline: ModelPipeline | ModelSlot,
        count: int,
        on_results: ResultSink,
        on_failure: FailureSink,
        *,
        queue_size: int,
        max_batch: int = 8,
        batch_wait_s: float = 0.0,
        recover: Recover = _no_recovery,
        on_served: Callable[[], None] = lambda: None,
    ) -> None:
        if count < 1:
            msg = f"at least one inference worker, not {count}"
            raise ValueError(msg)
        self.slot = pipeline if isinstance(pipeline, ModelSlot) else ModelSlot(pipeline)
        self._recover = recover
        self._recover_lock = threading.Lock()
        self._backend_lock = threading.Lock()
        self.workers: list[InferenceWorker] = []
        self.queue: queue.Queue[WorkItem]
        if count == 1:
            self.queue = queue.Queue(maxsize=queue_size)
            self.workers.append(
                InferenceWorker(
                    self.slot,
                    self.queue,
                    on_results,
                    on_failure,
                    max_batch=max_batch,
                    batch_wait_s=batch_wait_s,
                    recover=recover,
                    on_served=on_served,
                )
            )
            return
        sharded = ShardedQueue(queue_size, count)
        self.queue = sharded
        for index in range(count):
            self.workers.append(
                InferenceWorker(
                    self.slot,
                    sharded.shard(index),
                    on_results,
                    on_failure,
                    max_batch=max_batch,
                    batch_wait_s=batch_wait_s,
                    recover=self._recover_one_at_a_time,
                    name=f"inference-worker-{index + 1}",
                    serial=self._serial,
                    on_served=on_served,
                )
            )

    @property
    def count(self) -> int:
        """How many workers serve."""
        return len(self.workers)

    @property
    def pipeline(self) -> ModelPipeline:
        """The model currently serving."""
        return self.slot.pipeline

    def swap(self, new: ModelPipeline) -> ModelPipeline:
        """Serve `new` from every worker's next batch on; returns the previous model (open)."""
        return self.slot.swap(new)

    def replace(self, expected: ModelPipeline, new: ModelPipeline) -> bool:
        """Serve `new` instead of `expected`, unless another swap came first (then False)."""
        return self.slot.replace(expected, new)

    def start(self) -> None:
        """Start every worker thread."""
        for worker in self.workers:
            worker.start()

    def is_alive(self) -> bool:
        """True while every worker thread runs."""
        return all(worker.is_alive() for worker in self.workers)

    def busy(self) -> tuple[float, ModelPipeline] | None:
        """The oldest running backend call of any worker (what the watchdog judges), or None."""
        calls = [call for worker in self.workers if (call := worker.busy()) is not None]
        return min(calls, key=lambda call: call[0]) if calls else None

    def busy_seconds(self) -> float:
        """Seconds all workers spent in backend calls since start."""
        return sum(worker.busy_seconds() for worker in self.workers)

    def watches(self) -> list[Watched]:
        """One supervised thread per worker ("inference worker" when there is one)."""
        if len(self.workers) == 1:
            return [Watched("inference worker", self.workers[0].is_alive)]
        return [
            Watched(f"inference worker {index + 1}", worker.is_alive)
            for index, worker in enumerate(self.workers)
        ]

    def watch_progress(self, supervisor: Supervisor) -> None:
        """With several workers, each one's progress too: one stuck worker stalls its sensors
        while the others serve."""
        if len(self.workers) > 1:
            for index, watched in enumerate(self.watches()):
                supervisor.watch_progress(watched.name, functools.partial(self.progress, index))

    def progress(self, index: int) -> tuple[int, int, bool]:
        """(windows waiting for worker `index`, windows it finished, a backend call running)."""
        worker = self.workers[index]
        waiting = (
            self.queue.shard_size(index)
            if isinstance(self.queue, ShardedQueue)
            else self.queue.qsize()
        )
        return waiting, worker.processed, worker.busy() is not None

    def stop(self, timeout: float) -> bool:
        """Finish what is queued, then stop every worker; False if the queue did not drain."""
        if len(self.workers) == 1:
            return self.workers[0].stop(timeout)
        deadline = time.monotonic() + timeout
        while (
            not self.queue.empty() and time.monotonic() < deadline and self.is_alive()
        ):  # a dead worker's shard never drains: do not wait for it
            time.sleep(0.005)
        stopped = [worker.stop(max(deadline - time.monotonic(), 0.0)) for worker in self.workers]
        return all(stopped)

    def _recover_one_at_a_time(
        self, failed: ModelPipeline, exc: Exception, since: float
    ) -> ModelPipeline | None:
        """One rebuild at a time: a worker whose call failed with the same pipeline meanwhile
        finds it replaced and retries on the rebuilt one."""
        with self._recover_lock:
            return self._recover(failed, exc, since)

    def _serial(self, pipeline: ModelPipeline) -> AbstractContextManager[object]:
        if shares_session(pipeline.info.name):
            return contextlib.nullcontext()
        return self._backend_lock
