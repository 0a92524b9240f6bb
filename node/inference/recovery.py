"""Backend recovery: when a batch fails, rebuild the model's backend (or fall back) and say so.

This is the one path every backend failure takes, whether the backend noticed it itself (a
HailoRT timeout, an error status) or the watchdog aborted a call past its deadline
(node/inference/watchdog.py). The worker calls the recovery with the pipeline that failed; the
recovery closes it (on a Hailo that releases the device, which resets a hung chip), loads the
same bundle on the same backend again (contract, warm-up and golden check, as for any load),
and hands the rebuilt pipeline back for the worker to retry the batch on. When the rebuild fails
it falls back to ONNX Runtime if `fallback = "onnx"`, otherwise it reports, backs off
(1 s doubling to 30 s) and tries again on a later batch; windows that meet a broken backend in
between are reported as failed, never dropped silently. While the backend is down `healthy` is
False (`/readyz` says 503), and the report on recovery says how long serving stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.bundle import Bundle
from runtime.pipeline import ModelPipeline
from schemas.messages import ErrorKind

logger = logging.getLogger(__name__)

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 30.0

Loader = Callable[[Bundle, str], ModelPipeline]
"""Load a bundle on a named backend (with warm-up and golden check)."""
Reporter = Callable[[ErrorKind, str], object]
Replaced = Callable[[ModelPipeline, ModelPipeline, str], None]
"""Called after a swap with (failed, rebuilt, backend reason)."""


@dataclass(frozen=True, slots=True)
class RecoveryStats:
    """What the recovery has done since start (telemetry and /metrics read it)."""

    healthy: bool
    down_s: float
    """How long the backend has been down now (0 when healthy)."""
    rebuilds: int
    fallbacks: int
    failed_rebuilds: int
    last_downtime_s: float | None
    """How long serving stopped during the last outage that ended."""


class BackendRecovery:
    """Rebuilds a failed backend; the worker's `recover` hook."""

    def __init__(
        self,
        *,
        current: Callable[[], ModelPipeline],
        replace: Callable[[ModelPipeline, ModelPipeline], bool],
        load: Loader,
        fallback: str,
        report: Reporter,
        on_replaced: Replaced,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._current = current
        self._replace = replace
        self._load = load
        self._fallback = fallback
        self._report = report
        self._on_replaced = on_replaced
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._next_attempt = 0.0
        self._backoff = BACKOFF_FIRST_S
        self._rebuilds = 0
        self._fallbacks = 0
        self._failed_rebuilds = 0
        self._last_downtime: float | None = None

    @property
    def healthy(self) -> bool:
        """False from a failed batch until a rebuilt backend serves again."""
        with self._lock:
            return self._down_since is None

    def served(self) -> None:
        """A batch succeeded: the backend serves (clears an outage however it ended, e.g. a hot
        swap that replaced the failed pipeline, or a retry that worked)."""
        if self._down_since is None:  # the common case, without the lock
            return
        with self._lock:
            if self._down_since is None:
                return
            self._last_downtime = round(self._clock() - self._down_since, 3)
            self._down_since = None
            self._backoff = BACKOFF_FIRST_S
            self._next_attempt = 0.0
        logger.info("backend serving again after %.2f s", self._last_downtime)

    def stats(self) -> RecoveryStats:
        """Counters and the current outage."""
        with self._lock:
            down = 0.0 if self._down_since is None else self._clock() - self._down_since
            return RecoveryStats(
                healthy=self._down_since is None,
                down_s=round(down, 3),
                rebuilds=self._rebuilds,
                fallbacks=self._fallbacks,
                failed_rebuilds=self._failed_rebuilds,
                last_downtime_s=self._last_downtime,
            )

    def __call__(
        self, failed: ModelPipeline, exc: Exception, since: float | None = None
    ) -> ModelPipeline | None:
        """A pipeline to retry the failed batch on, or None (the batch is then given up).

        `since` is when the failed call began: the outage is counted from there."""
        with self._lock:
            now = self._clock()
            if self._down_since is None:
                self._down_since = now if since is None else min(since, now)
            current = self._current()
            if current is not failed:
                return current  # a hot swap came in meanwhile: retry on what serves now
            if now < self._next_attempt:
                return None  # backing off after a failed rebuild
        name = failed.info.name
        logger.error("%s backend failed (%s); rebuilding it", name, exc)
        failed.close()  # releases the device: a hung chip is reset when its last owner leaves
        rebuilt, reason = self._rebuild(failed.bundle, name, exc)
        if rebuilt is None:
            return None
        if not self._replace(failed, rebuilt):
            rebuilt.close()
            return self._current()
        with self._lock:
            down = self._clock() - (self._down_since or now)
            self._down_since = None
            self._last_downtime = round(down, 3)
            self._backoff = BACKOFF_FIRST_S
            self._next_attempt = 0.0
        self._on_replaced(failed, rebuilt, reason)
        self._report(
            ErrorKind.BACKEND_RECOVERY,
            f"{name} failed ({exc}); {reason}; serving stopped for {down:.2f} s",
        )
        return rebuilt

    def _rebuild(
        self, bundle: Bundle, name: str, exc: Exception
    ) -> tuple[ModelPipeline | None, str]:
        try:
            rebuilt = self._load(bundle, name)
        except Exception as error:
            failure: Exception = error
        else:
            with self._lock:
                self._rebuilds += 1
            return rebuilt, f"rebuilt the {name} backend"
        if self._fallback == "onnx" and name != "onnx" and bundle.onnx is not None:
            try:
                rebuilt = self._load(bundle, "onnx")
            except Exception as error:
                failure = error
            else:
                with self._lock:
                    self._fallbacks += 1
                self._report(
                    ErrorKind.BACKEND_FALLBACK,
                    f"{name} failed ({exc}) and could not be rebuilt ({failure}); now serving on "
                    "onnx. Check the device (imu-node doctor) and restart to return to it",
                )
                return rebuilt, f"fallback from {name}: {failure}"
        with self._lock:
            self._failed_rebuilds += 1
            wait = self._backoff
            self._next_attempt = self._clock() + wait
            self._backoff = min(self._backoff * 2, BACKOFF_MAX_S)
        logger.error(
            "rebuilding the %s backend failed: %s; next try in %.0f s", name, failure, wait
        )
        self._report(
            ErrorKind.BACKEND_RECOVERY,
            f"{name} failed ({exc}) and rebuilding it failed ({failure}); next try in "
            f"{wait:.0f} s, windows until then are reported failed",
        )
        return None, ""
