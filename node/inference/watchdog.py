"""The inference watchdog: a backend call past its deadline is reported, aborted, and escalated.

A named thread looks at the worker's running call a few times per deadline. Past the deadline
it reports the stall once, marks the node not ready, and asks the backend to abort the call
(HailoRT: shut the pipeline down; ONNX Runtime: RunOptions.terminate); the call then returns
with an error and the worker's recovery (node/inference/recovery.py) rebuilds the backend: one
path for every failure. A call still running a full deadline after its abort cannot be freed
from inside the process: the watchdog then calls `on_stuck`, and the node exits non-zero for
systemd (or whatever supervises it) to restart it.

The deadline is `inference_deadline_ms` when set; otherwise it is derived from the model
(`auto_deadline_s`): many times what a full batch took at the golden check, never under one
second, and for accelerators never under 2.5 device timeouts, so the backend's own timeout and
retry get their turn first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from node.supervisor import thread_running
from runtime.pipeline import ModelPipeline

logger = logging.getLogger(__name__)

DEADLINE_FLOOR_S = 1.0
"""No call is judged stuck sooner."""
BATCH_COST_FACTOR = 20.0
"""Auto deadline: this many times the golden check's time per window, for a full batch."""
DEVICE_TIMEOUT_FACTOR = 2.5
"""Auto deadline on an accelerator: this many device timeouts (one try and its retry fit)."""

Busy = Callable[[], "tuple[float, ModelPipeline] | None"]
StallHandler = Callable[[ModelPipeline, float, float], object]
"""(pipeline, seconds running, deadline seconds)."""


def auto_deadline_s(pipeline: ModelPipeline, max_batch: int, device_timeout_ms: int) -> float:
    """The deadline of one backend call when none is configured."""
    per_window_ms = pipeline.ms_per_window or 0.0
    deadline = max(DEADLINE_FLOOR_S, BATCH_COST_FACTOR * per_window_ms * max_batch / 1000)
    if pipeline.info.name != "onnx":
        deadline = max(deadline, DEVICE_TIMEOUT_FACTOR * device_timeout_ms / 1000)
    return round(deadline, 3)


def deadline_policy(
    deadline_ms: int, max_batch: int, device_timeout_ms: int
) -> Callable[[ModelPipeline], float]:
    """The deadline of a call on a pipeline: `deadline_ms` when set, else `auto_deadline_s`."""
    if deadline_ms:
        return lambda _pipeline: deadline_ms / 1000
    return lambda pipeline: auto_deadline_s(pipeline, max_batch, device_timeout_ms)


def stall_reason(pipeline: ModelPipeline, elapsed: float, deadline: float) -> str:
    """What the errors topic says of a call past its deadline."""
    return (
        f"an inference call on {pipeline.info.name} has run {elapsed:.2f} s (deadline "
        f"{deadline:.2f} s); aborting it and rebuilding the backend"
    )


def stuck_reason(pipeline: ModelPipeline, elapsed: float, deadline: float) -> str:
    """What the errors topic says of a call that an abort did not free (the node exits)."""
    return (
        f"an inference call on {pipeline.info.name} still runs {elapsed:.2f} s after the "
        f"watchdog aborted it (deadline {deadline:.2f} s); exiting for a restart"
    )


class InferenceWatchdog:
    """Supervises the worker's backend calls against a deadline."""

    def __init__(
        self,
        *,
        busy: Busy,
        deadline_s: Callable[[ModelPipeline], float],
        on_stall: StallHandler,
        on_stuck: StallHandler,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._busy = busy
        self._deadline_s = deadline_s
        self._on_stall = on_stall
        self._on_stuck = on_stuck
        self._clock = clock
        self._stalled_call: tuple[float, int] | None = None
        self._stuck_call: tuple[float, int] | None = None
        self.stalls = 0
        """Calls that ran past their deadline since start."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inference-watchdog", daemon=True)

    def start(self) -> None:
        """Start watching."""
        self._thread.start()

    def is_alive(self) -> bool:
        """True while the watchdog thread runs (or before it was started)."""
        return thread_running(self._thread)

    def stop(self) -> None:
        """Stop watching (returns within a tick)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2.0)

    @property
    def stalled(self) -> bool:
        """True while the running call is past its deadline."""
        busy = self._busy()
        return busy is not None and self._stalled_call == _key(busy)

    def check(self) -> None:
        """One look at the running call (the thread calls this; tests may too)."""
        busy = self._busy()
        if busy is None:
            return
        since, pipeline = busy
        deadline = self._deadline_s(pipeline)
        elapsed = self._clock() - since
        key = _key(busy)
        if elapsed > deadline and self._stalled_call != key:
            self._stalled_call = key
            self.stalls += 1
            logger.error(
                "inference call on %s has run %.2f s (deadline %.2f s); aborting it",
                pipeline.info.name,
                elapsed,
                deadline,
            )
            self._on_stall(pipeline, elapsed, deadline)
            busy_now = self._busy()
            if busy_now is not None and _key(busy_now) == key:  # still that call: abort it
                pipeline.backend.abort()
        elif elapsed > 2 * deadline and self._stalled_call == key and self._stuck_call != key:
            self._stuck_call = key
            logger.critical(
                "inference call on %s still runs %.2f s after its abort",
                pipeline.info.name,
                elapsed,
            )
            self._on_stuck(pipeline, elapsed, deadline)

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self._busy()
            tick = 0.25 if busy is None else min(0.25, max(0.02, self._deadline_s(busy[1]) / 4))
            if self._stop.wait(tick):
                return
            try:
                self.check()
            except Exception:  # the watchdog must outlive a bug in what it watches
                logger.exception("watchdog check failed")


def _key(busy: tuple[float, ModelPipeline]) -> tuple[float, int]:
    return busy[0], id(busy[1])
