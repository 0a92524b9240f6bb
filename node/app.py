"""The node: wires session, ingest, workers, results, telemetry, updates and presence together.

Lifecycle: `start()` loads nothing (the model is loaded and golden-checked before construction),
starts the worker and telemetry threads and the MQTT session; on every connection the node
publishes its retained birth status and model state. `stop()` unsubscribes the sensor topics,
drains the queue, waits for every result to be acknowledged, publishes a retained `stopped`
status and disconnects (so the will's `offline` only ever means a crash or a lost link).

A window's path does not pass through here: ingest puts it on the workers' queue, a worker
hands its result to the result publisher, which hands it to the outbox.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from common.version import software_version
from node.config import NodeConfig, default_spool_dir
from node.identity import default_node_id
from node.inference.recovery import BackendRecovery
from node.inference.watchdog import InferenceWatchdog, deadline_policy, stall_reason, stuck_reason
from node.inference.worker import ModelSlot
from node.inference.workers import WorkerPool, resolve_workers
from node.ingest.router import node_ingest
from node.metrics import NodeMetrics
from node.mqtt.outbox import Outbox
from node.mqtt.resume import resume
from node.presence import Identity, Presence, node_session
from node.reporting import ErrorReporter
from node.results import ResultPublisher
from node.supervisor import Supervisor, Watched
from node.telemetry import TelemetryLoop
from node.updates.manager import ManagerSettings, ModelManager
from node.updates.startup import open_configured_model, open_model
from runtime.pipeline import ModelPipeline, load_model
from schemas import topics
from schemas.messages import ErrorKind, NodeState

if TYPE_CHECKING:
    from node.api.server import NodeHttp

logger = logging.getLogger(__name__)

EXIT_WATCHDOG = 70
"""Exit status when the watchdog cannot free a stuck inference call (EX_SOFTWARE): restart."""
STALL_S = 30.0
"""Windows waiting and none finished for this long (no backend call running) is a stall."""
EXIT_CONFIG = 78
"""Exit status when the broker keeps refusing this node's login as configured (EX_CONFIG)."""
EXIT_DUPLICATE = 76
"""Exit status when another process took this node's session (EX_PROTOCOL): do not restart
(the systemd unit has RestartPreventExitStatus=76), or the two would take it in turns."""


class NodeApp:
    """One running node."""

    def __init__(
        self,
        config: NodeConfig,
        pipeline: ModelPipeline,
        backend_reason: str = "requested",
        http: NodeHttp | None = None,
    ) -> None:
        """Build the node on a loaded `pipeline`; `http` is the HTTP side `open` started early
        (opened here from `config.http_listen` when not given)."""
        self.config = config
        self.fatal: str | None = None
        """Why the node must exit with `fatal_status` (set once, by `_fail`), else None."""
        self.fatal_status = EXIT_WATCHDOG
        self.on_fatal: Callable[[], None] = lambda: None
        """Called once when `fatal` is set (the CLI stops and exits non-zero)."""
        self.node_id = config.node_id or default_node_id()
        self.instance = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.metrics = NodeMetrics()
        self._stopped = threading.Event()
        identity = Identity.of(config, self.node_id, self.instance, self.started_at)
        self.session = node_session(config, identity, pipeline, backend_reason, self._announce)
        spool_dir = (
            (config.spool_dir or default_spool_dir(self.node_id)) if config.spool_max_mb else None
        )
        self.session.on_gave_up(lambda reason: self._fail(reason, EXIT_CONFIG))
        self.outbox = Outbox.open(self.session, spool_dir, config.spool_max_mb)  # takes a lock:
        try:  # released when anything below fails
            self._build(pipeline, identity, backend_reason, http)
        except BaseException:
            self.outbox.stop()
            raise

    def _build(
        self,
        pipeline: ModelPipeline,
        identity: Identity,
        backend_reason: str,
        http: NodeHttp | None,
    ) -> None:
        config = self.config
        slot = ModelSlot(pipeline)
        self.reporter = ErrorReporter(
            self.node_id, self.outbox.publish, self.metrics, per_second=config.error_reports_per_s
        )
        self.presence = Presence(
            identity,
            self.session,
            self.reporter,
            pipeline=lambda: slot.pipeline,
            on_taken_over=lambda reason: self._fail(reason, EXIT_DUPLICATE),
            backend_reason=backend_reason,
        )
        results = ResultPublisher(
            self.node_id,
            self.outbox.publish if config.results_qos == 1 else self.outbox.publish_at_most_once,
            self.metrics,
            reporter=self.reporter,
            unsent_reason="outbox_full" if config.results_qos == 1 else "offline",
        )
        self.recovery = BackendRecovery(
            current=lambda: slot.pipeline,
            replace=slot.replace,
            load=lambda bundle, name: load_model(bundle, name, config.backend_options()),
            fallback=config.fallback,
            report=self.reporter.report,
            on_replaced=self._replaced,
        )
        self.worker = WorkerPool(
            slot,
            resolve_workers(config.workers, pipeline.info.name, config.threads),
            results,
            results.failed,
            queue_size=config.queue_size,
            max_batch=config.max_batch,
            batch_wait_s=config.batch_wait_ms / 1000,
            recover=self.recovery,
            on_served=self.recovery.served,
        )
        self.queue = self.worker.queue
        self.ingest = node_ingest(
            (self.node_id, self.instance),
            config.hop,
            config.share_group,
            work=self.queue,
            reporter=self.reporter,
            metrics=self.metrics,
            ack_later=self.session.ack_later,
        )
        self.share = self.ingest.share
        self.watchdog = InferenceWatchdog(
            busy=self.worker.busy,
            deadline_s=deadline_policy(
                config.inference_deadline_ms, config.max_batch, config.hailo_timeout_ms
            ),
            on_stall=lambda *call: self.reporter.report(ErrorKind.WATCHDOG, stall_reason(*call)),
            on_stuck=self._stuck,
        )
        self.manager = ModelManager(
            ManagerSettings.for_node(config, self.node_id),
            session=self.session,
            reporter=self.reporter,
            loader=functools.partial(open_model, config),
            swap=self.worker.swap,
            active=pipeline,
        )
        self.telemetry = TelemetryLoop(
            node_id=self.node_id,
            interval_s=config.telemetry_interval_s,
            metrics=self.metrics,
            work=self.queue,
            model=lambda: slot.pipeline,
            backend_reason=lambda: self.presence.backend_reason,
            publish=lambda topic, payload: self.session.publish(topic, payload, qos=0),
            spool=self.outbox.stats,
            health=self._backend_health,
        )
        resume(self.outbox, self.ingest.seen)
        self.supervisor = self._supervisor()
        self.http = self._attach_http(http) if http or config.http_listen else None

    @property
    def backend_reason(self) -> str:
        """Why this backend serves (requested, auto's choice, or a fallback)."""
        return self.presence.backend_reason

    @classmethod
    def open(cls, config: NodeConfig, stopping: threading.Event | None = None) -> NodeApp | None:
        """Read the configured bundle (or wait for the fleet's first one: None when `stopping`
        is set meanwhile), pick and prove the backend, and build the node.

        The HTTP side (with `http_listen`) answers from the start: while the model is read or
        awaited, `/livez` says alive and `/healthz` 503 says why the node cannot infer yet."""
        node_id = config.node_id or default_node_id()
        http = _early_http(config, node_id)
        try:
            opened = open_configured_model(config, node_id, stopping)
            if opened is None:
                if http is not None:
                    http.stop()
                return None
            pipeline, reason = opened
            try:
                return cls(config, pipeline, reason, http)
            except BaseException:
                pipeline.close()  # release the device (or the session) this attempt opened
                raise
        except BaseException:
            if http is not None:
                http.stop()
            raise

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start serving; returns at once (the session connects in the background)."""
        sys.setswitchinterval(self.config.switch_interval_ms / 1000)
        group = self.config.share_group
        sensors = self.config.sensors
        self.session.route(
            topics.window(sensors), self.ingest.on_window, share=group, deferred_ack=True
        )
        # a sensor's samples must reach one node: share groups divide them by sensor
        self.session.route(topics.samples(sensors), self.ingest.on_samples, deferred_ack=True)
        if group:
            statuses = functools.partial(
                self.presence.on_group_status, self.ingest.on_member_status
            )
            self.session.route(topics.NODES_STATUS_FILTER, statuses)
            self.session.route(topics.motifs(sensors), self.ingest.on_result)
        else:
            self.session.route(topics.node_status(self.node_id), self.presence.on_message)
        if self.config.follow_desired:
            self.manager.attach()
        self.worker.start()
        self.watchdog.start()
        self.telemetry.start()
        self.outbox.start()
        self.session.start()
        if self.http is not None:
            if not self.http.started:
                self.http.start()
            self.supervisor.watch(Watched("HTTP", self.http.is_alive))
        self.supervisor.start()
        ref, backend = self.worker.pipeline.ref, self.worker.pipeline.info.name
        logger.info(
            "node %s starting: broker %s, model %s %s on %s, hop %d, queue %d, %d workers",
            *(self.node_id, self.config.broker_address, ref.name, ref.version, backend),
            *(self.config.hop, self.config.queue_size, self.worker.count),
        )

    def stop(self, reason: str = "stopped") -> bool:
        """Drain and stop cleanly; True when every window was served and every result acked."""
        if self._stopped.is_set():
            return True
        self._stopped.set()
        self.supervisor.stop()
        if self.http is not None:
            self.http.stop()
        self.manager.stop()
        timeout = self.config.drain_timeout_s
        sensors = self.config.sensors
        if self.share is not None:  # the windows cut before `stopping` came back are ours
            self.presence.leave(reason, lambda: self.ingest.share_leaving)
        for topic_filter in (topics.window(sensors), topics.samples(sensors)):
            self.session.unroute(topic_filter)
        drained = self.worker.stop(timeout)
        self.watchdog.stop()
        self.ingest.close()
        self.telemetry.stop()
        acked = self.session.wait_published(timeout)
        if not drained or not acked:
            left = (self.queue.qsize(), self.session.pending_publishes())
            logger.warning("stopping with work left: %d queued, %d results unacknowledged", *left)
        self.presence.publish(NodeState.STOPPED, reason)
        self.session.wait_published(min(timeout, 5.0))
        self.outbox.stop()
        self.session.stop()
        self.worker.pipeline.close()
        logger.info("node %s stopped (%s)", self.node_id, reason)
        return drained and acked

    def _fail(self, reason: str, status: int) -> None:
        """The node must exit with `status` (the first reason wins); the CLI stops it."""
        if self.fatal is None:
            self.fatal = reason
            self.fatal_status = status
            self.on_fatal()

    # -- wiring -----------------------------------------------------------------------------

    def _supervisor(self) -> Supervisor:
        supervisor = Supervisor(
            [
                Watched("MQTT network", self.session.is_alive),
                *self.worker.watches(),
                Watched("inference watchdog", self.watchdog.is_alive),
                Watched("model manager", self.manager.is_alive),
                Watched("result outbox", self.outbox.is_alive),
                Watched("telemetry", self.telemetry.is_alive),
            ],
            self._progress,
            stall_s=STALL_S,
            on_failure=self._supervision_failed,
        )
        self.worker.watch_progress(supervisor)
        return supervisor

    def _attach_http(self, http: NodeHttp | None) -> NodeHttp:
        # imported only when asked for: prometheus-client and http.server cost memory on a Pi
        from node.api.prometheus import NodeSources  # noqa: PLC0415
        from node.api.server import open_node_http  # noqa: PLC0415

        http = http or open_node_http(self.config, self.node_id)
        sources = NodeSources(
            node_id=self.node_id,
            group=self.config.group,
            software_version=software_version(),
            metrics=self.metrics,
            session=self.session,
            outbox=self.outbox,
            queue_depth=self.queue.qsize,
            queue_capacity=self.queue.maxsize,
            pipeline=lambda: self.worker.pipeline,
            backend_health=self._backend_health,
            stale_since=lambda: self.manager.state.stale_since,
            busy_seconds=self.worker.busy_seconds,
            workers=self.worker.count,
        )
        http.attach(sources, self.queue, self.readiness)
        return http

    # -- health -----------------------------------------------------------------------------

    def readiness(self) -> dict[str, bool]:
        """What `/readyz` checks: broker link, serving, a healthy backend, room in the queue."""
        return {
            "broker_connected": self.session.is_connected,
            "serving": self.worker.is_alive() and not self._stopped.is_set(),
            "backend_healthy": self.recovery.healthy and not self.watchdog.stalled,
            "model_manager": self.manager.is_alive(),
            "supervised": self.supervisor.healthy,
            "queue_has_room": self.queue.qsize() < self.queue.maxsize,
        }

    def _backend_health(self) -> tuple[bool, int, int]:
        """(healthy, rebuilds and fallbacks, watchdog stalls) for telemetry."""
        stats = self.recovery.stats()
        healthy = stats.healthy and not self.watchdog.stalled
        return healthy, stats.rebuilds + stats.fallbacks, self.watchdog.stalls

    def _progress(self) -> tuple[int, int, bool]:
        """(windows waiting, windows finished or given up so far, a backend call running)."""
        _, done, _, dropped, _ = self.metrics.totals()
        return self.queue.qsize(), done + sum(dropped.values()), self.worker.busy() is not None

    def _supervision_failed(self, reason: str) -> None:
        """A thread died or work stalled: report, then exit 70 for systemd to restart us."""
        self.reporter.report(ErrorKind.WATCHDOG, f"{reason}; exiting for a restart")
        self._fail(reason, EXIT_WATCHDOG)

    def _stuck(self, pipeline: ModelPipeline, elapsed: float, deadline: float) -> None:
        reason = stuck_reason(pipeline, elapsed, deadline)
        self.reporter.report(ErrorKind.WATCHDOG, reason)
        self._fail(reason, EXIT_WATCHDOG)

    # -- models -----------------------------------------------------------------------------

    def _announce(self) -> None:
        """On every connection: retained birth and model state (network thread)."""
        self.presence.publish(NodeState.ONLINE)
        self.manager.publish_state()

    def _replaced(self, failed: ModelPipeline, rebuilt: ModelPipeline, reason: str) -> None:
        """The recovery swapped a rebuilt (or fallback) pipeline in (worker thread)."""
        self.manager.adopt(rebuilt)
        if rebuilt.info.name != failed.info.name:
            self.presence.backend_reason = reason
            self._announce()  # the retained status names the backend


def _early_http(config: NodeConfig, node_id: str) -> NodeHttp | None:
    """The HTTP side, serving before the model is there (None without `http_listen`)."""
    if not config.http_listen:
        return None
    from node.api.server import open_node_http  # noqa: PLC0415 (as in _attach_http)

    http = open_node_http(config, node_id)
    http.start()
    return http
