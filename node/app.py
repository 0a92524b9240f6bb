"""The node: wires session, ingest, worker, results, telemetry and status together.

Lifecycle: `start()` loads nothing (the model is loaded and golden-checked before construction),
starts the worker and telemetry threads and the MQTT session; on every connection the node
publishes its retained birth status and model state. `stop()` unsubscribes the sensor topics,
drains the queue, waits for every result to be acknowledged, publishes a retained `stopped`
status and disconnects (so the will's `offline` only ever means a crash or a lost link).
"""

from __future__ import annotations

import logging
import queue
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
import paho.mqtt.client as mqtt
from pydantic import ValidationError

from common.bundle import Bundle, read_bundle
from common.http import parse_listen
from common.mqtt.session import MqttSession
from common.signing import load_trust, verify_manifest
from common.version import software_version
from node.config import NodeConfig, default_spool_dir, default_state_dir
from node.errors import ConfigError
from node.identity import default_node_id
from node.inference.recovery import BackendRecovery
from node.inference.watchdog import InferenceWatchdog, auto_deadline_s
from node.inference.worker import WorkItem
from node.inference.workers import WorkerPool, resolve_workers
from node.ingest.router import Ingest
from node.ingest.share import SensorShare
from node.ingest.windower import SampleWindower
from node.metrics import NodeMetrics
from node.mqtt.journal import Journal
from node.mqtt.outbox import Outbox
from node.mqtt.spool import Spool
from node.reporting import ErrorReporter
from node.results import ResultPublisher
from node.supervisor import Supervisor, Watched
from node.telemetry import TelemetryLoop
from node.updates.fetch import FetchPolicy
from node.updates.manager import ManagerSettings, ModelManager
from runtime.pipeline import BatchResult, ModelPipeline, load_model, open_pipeline
from schemas import topics
from schemas.codec import encode
from schemas.messages import (
    ErrorKind,
    NodeState,
    NodeStatus,
)

if TYPE_CHECKING:
    from node.api.server import NodeHttp

logger = logging.getLogger(__name__)

NODE_SESSION_EXPIRY_S = 300
"""The broker keeps a node's session, and the windows queued for it, through 5-minute outages."""
EXIT_WATCHDOG = 70
"""Exit status when the watchdog cannot free a stuck inference call (EX_SOFTWARE): restart."""
STALL_S = 30.0
"""Windows waiting and none finished for this long (no backend call running) is a stall."""
SHARE_KEEP_SAMPLES = 1000
"""Share group: samples a node keeps from before each sensor's next window (10 s at 100 Hz), to
serve the windows a member that went away left without a result."""
SHARE_LEAVE_S = 5.0
"""Share group, clean stop: how long to wait for the `stopping` status to come back (until then
the windows cut are this node's to serve)."""
EXIT_DUPLICATE = 76
"""Exit status when another process took this node's session (EX_PROTOCOL): do not restart
(the systemd unit has RestartPreventExitStatus=76), or the two would take it in turns."""


def _started_later(status: NodeStatus, started_at: float, instance: str) -> bool:
    """True when the process behind `status` started after this one (ties: by instance id)."""
    theirs = status.started_at if status.started_at is not None else status.ts
    return (theirs, status.instance) > (started_at, instance)


def client_id_for(node_id: str) -> str:
    """The MQTT client id of a node: stable, so a restarted node resumes its session."""
    return f"imu-node-{node_id}"


class NodeApp:
    """One running node."""

    def __init__(
        self, config: NodeConfig, pipeline: ModelPipeline, backend_reason: str = "requested"
    ) -> None:
        self.config = config
        self.backend_reason = backend_reason
        self.fatal: str | None = None
        """Why the node must exit non-zero (a call the watchdog could not free, another process
        took this node's session over), else None."""
        self.fatal_status = EXIT_WATCHDOG
        """The exit status that goes with `fatal`."""
        self.on_fatal: Callable[[], None] = lambda: None
        """Called once when `fatal` is set (the CLI stops and exits non-zero)."""
        self.node_id = config.node_id or default_node_id()
        self.instance = uuid.uuid4().hex[:12]
        self.started_at = time.time()
        self.metrics = NodeMetrics()
        self._stopped = threading.Event()
        self._conflicts: set[str] = set()
        self._birth_seen = False
        self.session = MqttSession(
            config.connection().session_settings(
                client_id=client_id_for(self.node_id),
                manual_ack=True,
                keepalive_s=config.keepalive_s,
                will=(
                    topics.node_status(self.node_id),
                    self._status(NodeState.OFFLINE, pipeline, "connection lost (will)"),
                ),
                max_pending_publishes=config.max_pending_publishes,
                session_expiry_s=NODE_SESSION_EXPIRY_S,
            ),
            on_connected=self._announce,
        )
        self.worker = WorkerPool(
            pipeline,
            resolve_workers(config.workers, pipeline.info.name, config.threads),
            self._results_ready,
            self._inference_failed,
            queue_size=config.queue_size,
            max_batch=config.max_batch,
            batch_wait_s=config.batch_wait_ms / 1000,
            recover=lambda failed, exc, since: self.recovery(failed, exc, since),  # noqa: PLW0108
        )
        self.queue: queue.Queue[WorkItem] = self.worker.queue
        self.reporter = ErrorReporter(
            self.node_id, self._publish_qos1, self.metrics, per_second=config.error_reports_per_s
        )
        windower = SampleWindower(
            config.hop,
            keep=SHARE_KEEP_SAMPLES if config.share_group else 0,
            align=bool(config.share_group),
        )
        self.share = (
            SensorShare(
                self.node_id,
                self.instance,
                config.share_group,
                config.hop,
                remember=SHARE_KEEP_SAMPLES // config.hop + 4,
                stream_end=windower.end,
            )
            if config.share_group
            else None
        )
        self.ingest = Ingest(
            self.queue,
            windower,
            self.reporter,
            self.metrics,
            ack_later=self.session.ack_later,
            share=self.share,
        )
        self.session.on_taken_over(self._taken_over)
        self.recovery = BackendRecovery(
            current=lambda: self.worker.pipeline,
            replace=self.worker.replace,
            load=lambda bundle, name: load_model(bundle, name, config.backend_options()),
            fallback=config.fallback,
            report=lambda kind, reason: self.reporter.report(kind, reason),  # noqa: PLW0108
            on_replaced=self._replaced,
        )
        self.watchdog = InferenceWatchdog(
            busy=self.worker.busy,
            deadline_s=self.deadline_s,
            on_stall=self._stalled,
            on_stuck=self._stuck,
        )
        self._results = (
            ResultPublisher(self.node_id, self._publish_qos1, self.metrics)
            if config.results_qos == 1
            else ResultPublisher(
                self.node_id, self._publish_qos0, self.metrics, unsent_reason="offline"
            )
        )
        self.manager = ModelManager(
            ManagerSettings(
                node_id=self.node_id,
                group=config.group,
                cache_dir=config.cache_dir,
                max_bundle_bytes=config.max_bundle_bytes,
                trusted_key=load_trust(config.trust_key) if config.trust_key else None,
                state_file=(config.state_dir or default_state_dir(self.node_id))
                / "desired-history.json",
                fetch_timeout_s=config.fetch_timeout_s,
                fetch_policy=FetchPolicy(
                    file_root=config.file_url_root, total_timeout_s=config.fetch_timeout_s
                ),
            ),
            session=self.session,
            reporter=self.reporter,
            loader=self._load,
            swap=self.worker.swap,
            active=pipeline,
        )
        self.telemetry = TelemetryLoop(
            node_id=self.node_id,
            interval_s=config.telemetry_interval_s,
            metrics=self.metrics,
            work=self.queue,
            model=lambda: self.worker.pipeline,
            backend_reason=lambda: self.backend_reason,
            publish=lambda topic, payload: self.session.publish(topic, payload, qos=0),
            spool=lambda: self.outbox.stats(),  # noqa: PLW0108 (outbox is made below)
            health=self._backend_health,
        )
        spool = self._open_spool()  # opened last: it takes a lock
        journal = Journal(spool.folder / "inflight") if spool is not None else None
        self.outbox = Outbox(self.session, spool, journal)
        self._seed_from_spool()
        self._resume_journal()
        self.supervisor = Supervisor(
            [
                Watched("MQTT network", self.session.is_alive),
                *self._worker_watches(),
                Watched("inference watchdog", self.watchdog.is_alive),
                Watched("model manager", self.manager.is_alive),
                Watched("result outbox", self.outbox.is_alive),
                Watched("telemetry", self.telemetry.is_alive),
            ],
            self._progress,
            stall_s=STALL_S,
            on_failure=self._supervision_failed,
        )
        if self.worker.count > 1:  # one stuck worker stalls its sensors while the others serve
            for index in range(self.worker.count):
                self.supervisor.watch_progress(
                    f"inference worker {index + 1}",
                    lambda index=index: self.worker.progress(index),  # type: ignore[misc]
                )
        try:
            self.http = self._open_http() if config.http_listen else None
        except ConfigError:
            self.outbox.stop()  # releases the spool for the next attempt
            raise
        except OSError as exc:  # a taken port, an unreadable token, a bad TLS key
            self.outbox.stop()
            msg = f"cannot serve HTTP on {config.http_listen}: {exc}; check the http_* settings"
            raise ConfigError(msg) from exc

    @classmethod
    def open(cls, config: NodeConfig) -> NodeApp:
        """Read the configured bundle, pick and prove the backend, and build the node."""
        if config.model is None:
            msg = "no model: pass --model BUNDLE (build one with `imu-fleet bundle create`)"
            raise ConfigError(msg)
        bundle = read_bundle(config.model)
        if config.trust_key is not None:
            verify_manifest(bundle.manifest, load_trust(config.trust_key))
        pipeline, choice = open_pipeline(
            bundle,
            config.backend,
            config.backend_options(),
            fallback=config.fallback,
        )
        try:
            return cls(config, pipeline, choice.reason)
        except BaseException:
            pipeline.close()  # release the device (or the session) this attempt opened
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
            self.session.route(topics.NODES_STATUS_FILTER, self._on_node_status)
            self.session.route(topics.motifs(sensors), self.ingest.on_result)
        else:
            self.session.route(topics.node_status(self.node_id), self._on_status)
        if self.config.follow_desired:
            self.manager.attach()
        self.worker.start()
        self.watchdog.start()
        self.telemetry.start()
        self.outbox.start()
        self.session.start()
        if self.http is not None:
            self.http.start()
            self.supervisor.watch(Watched("HTTP", self.http.is_alive))
        self.supervisor.start()
        pipeline = self.worker.pipeline
        logger.info(
            "node %s starting: broker %s, model %s %s on %s, hop %d, queue %d, %d workers",
            self.node_id,
            self.config.broker_address,
            pipeline.ref.name,
            pipeline.ref.version,
            pipeline.info.name,
            self.config.hop,
            self.config.queue_size,
            self.worker.count,
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
        if self.share is not None:
            self._leave_share_group(reason)
        for topic_filter in (topics.window(sensors), topics.samples(sensors)):
            self.session.unroute(topic_filter)
        drained = self.worker.stop(timeout)
        self.watchdog.stop()
        self.ingest.close()
        self.telemetry.stop()
        acked = self.session.wait_published(timeout)
        if not drained or not acked:
            logger.warning(
                "stopping with work left: %d queued, %d results unacknowledged",
                self.queue.qsize(),
                self.session.pending_publishes(),
            )
        self.session.publish(
            topics.node_status(self.node_id),
            self._status(NodeState.STOPPED, self.worker.pipeline, reason),
            retain=True,
        )
        self.session.wait_published(min(timeout, 5.0))
        self.outbox.stop()
        self.session.stop()
        self.worker.pipeline.close()
        logger.info("node %s stopped (%s)", self.node_id, reason)
        return drained and acked

    # -- publishing -------------------------------------------------------------------------

    def _publish_qos1(
        self, topic: str, payload: bytes, on_safe: Callable[[], None] | None = None
    ) -> bool:
        return self.outbox.publish(topic, payload, on_safe)

    def _publish_qos0(
        self, topic: str, payload: bytes, on_safe: Callable[[], None] | None = None
    ) -> bool:
        """A result at QoS 0 (`results_qos = 0`): handed to the socket, never spooled; its
        window is acknowledged at once. False without a connection (the caller counts it)."""
        sent = self.session.is_connected and self.session.publish(topic, payload, qos=0)
        if sent and on_safe is not None:
            on_safe()
        return sent

    def _open_http(self) -> NodeHttp:
        # imported only when asked for: prometheus-client and http.server cost memory on a Pi
        from common.http import read_token_file, server_tls_context  # noqa: PLC0415
        from node.api.prometheus import NodeSources  # noqa: PLC0415
        from node.api.server import NodeHttp  # noqa: PLC0415

        assert self.config.http_listen is not None
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
        )
        config = self.config
        assert config.http_listen is not None
        token = None
        if config.http_token_file is not None:
            try:
                token = read_token_file(config.http_token_file, "http_token_file")
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        tls = None
        if config.http_tls_cert is not None and config.http_tls_key is not None:
            tls = server_tls_context(config.http_tls_cert, config.http_tls_key)
        return NodeHttp(
            parse_listen(config.http_listen),
            sources,
            self.queue,
            ready=self.readiness,
            infer_timeout_s=config.http_infer_timeout_s,
            token=token,
            tls=tls,
        )

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

    def deadline_s(self, pipeline: ModelPipeline) -> float:
        """How long one backend call on `pipeline` may run before the watchdog aborts it."""
        if self.config.inference_deadline_ms:
            return self.config.inference_deadline_ms / 1000
        return auto_deadline_s(pipeline, self.config.max_batch, self.config.hailo_timeout_ms)

    def _resume_journal(self) -> None:
        """Results an earlier run had in flight: publish them again (to the spool until the
        broker is back); those and the ones it settled last mark their windows served, so
        their re-sent copies do not run."""
        journal = self.outbox.journal
        if journal is None:
            return
        left = journal.leftovers()
        for topic, payload in left.settled:
            self._mark_served(topic, payload)
        for topic, payload in left.in_flight:
            self._mark_served(topic, payload)
            self.outbox.publish(topic, payload)

    def _mark_served(self, topic: str, payload: bytes) -> bool:
        """If `payload` is a result on `topic`, mark its window as served; True if it was."""
        parsed = topics.parse_sensor_topic(topic)
        if parsed is None or not topic.endswith("/motifs"):
            return False
        try:
            seq = orjson.loads(payload).get("seq")
        except orjson.JSONDecodeError:
            return False
        if not isinstance(seq, int):
            return False
        self.ingest.seen(parsed.sensor_id, seq)
        return True

    def _seed_from_spool(self) -> None:
        """Results an earlier run spooled name windows that were served: their re-sent copies
        (the broker re-sends what that run never acknowledged) are skipped, not run twice."""
        spool = self.outbox.spool
        if spool is None or not spool.stats().messages:
            return
        seeded = 0
        for segment in spool.seal():
            for topic, payload in spool.read(segment):
                seeded += self._mark_served(topic, payload)
        logger.info("%d spooled results from an earlier run mark their windows as served", seeded)

    def _open_spool(self) -> Spool | None:
        if self.config.spool_max_mb == 0:
            return None
        folder = self.config.spool_dir or default_spool_dir(self.node_id)
        return Spool(folder, self.config.spool_max_mb * 2**20)

    def _status(
        self, state: NodeState, pipeline: ModelPipeline, reason: str | None = None
    ) -> bytes:
        return encode(
            NodeStatus(
                state=state,
                node_id=self.node_id,
                instance=self.instance,
                ts=time.time(),
                started_at=self.started_at,
                software_version=software_version(),
                backend=pipeline.info.name,
                backend_reason=self.backend_reason,
                device=pipeline.info.detail if pipeline.info.name != "onnx" else None,
                model=pipeline.ref,
                config_digest=self.config.digest(),
                group=self.config.group,
                share_group=self.config.share_group,
                hop=self.config.hop,
                host=socket.gethostname(),
                reason=reason,
            )
        )

    def _announce(self) -> None:
        """On every connection: retained birth and model state (network thread)."""
        pipeline = self.worker.pipeline
        self.session.publish(
            topics.node_status(self.node_id), self._status(NodeState.ONLINE, pipeline), retain=True
        )
        self.manager.publish_state()

    def _load(self, bundle: Bundle) -> ModelPipeline:
        """Load a new model version on this node's backend (model manager thread)."""
        pipeline, _ = open_pipeline(
            bundle,
            self.config.backend,
            self.config.backend_options(),
            fallback=self.config.fallback,
        )
        return pipeline

    def _results_ready(
        self, batch: list[WorkItem], result: BatchResult, pipeline: ModelPipeline
    ) -> None:
        self.recovery.served()
        self._results(batch, result, pipeline)

    def _inference_failed(self, batch: list[WorkItem], exc: Exception) -> None:
        for item in batch:
            self.metrics.window_dropped("inference_failed")
            if item.reply is not None:  # POST /infer: the caller gets the error
                item.reply.set_exception(exc)
                continue
            self.reporter.report(
                ErrorKind.INFERENCE,
                f"backend failed on this window: {exc}",
                sensor_id=item.sensor_id,
                seq=item.seq,
            )
            if item.done is not None:
                item.done()  # reported: acknowledged, not sent to the backend again forever

    # -- backend health -----------------------------------------------------------------------

    def _replaced(self, failed: ModelPipeline, rebuilt: ModelPipeline, reason: str) -> None:
        """The recovery swapped a rebuilt (or fallback) pipeline in (worker thread)."""
        self.manager.adopt(rebuilt)
        if rebuilt.info.name != failed.info.name:
            self.backend_reason = reason
            self._announce()  # the retained status names the backend

    def _backend_health(self) -> tuple[bool, int, int]:
        """(healthy, rebuilds and fallbacks, watchdog stalls) for telemetry."""
        stats = self.recovery.stats()
        healthy = stats.healthy and not self.watchdog.stalled
        return healthy, stats.rebuilds + stats.fallbacks, self.watchdog.stalls

    def _worker_watches(self) -> list[Watched]:
        """One supervised thread per inference worker ("inference worker" when there is one)."""
        workers = self.worker.workers
        if len(workers) == 1:
            return [Watched("inference worker", workers[0].is_alive)]
        return [
            Watched(f"inference worker {index + 1}", worker.is_alive)
            for index, worker in enumerate(workers)
        ]

    def _progress(self) -> tuple[int, int, bool]:
        """(windows waiting, windows finished or given up so far, a backend call running)."""
        _, done, _, dropped, _ = self.metrics.totals()
        return self.queue.qsize(), done + sum(dropped.values()), self.worker.busy() is not None

    def _supervision_failed(self, reason: str) -> None:
        """A thread died or work stalled: report, then exit 70 for systemd to restart us."""
        self.reporter.report(ErrorKind.WATCHDOG, f"{reason}; exiting for a restart")
        if self.fatal is None:
            self.fatal = reason
            self.fatal_status = EXIT_WATCHDOG
            self.on_fatal()

    def _give_way(self, newer: NodeStatus) -> None:
        """A process started after this one serves as this node: stop, do not take turns."""
        reason = (
            f"a process started later (instance {newer.instance} on host {newer.host}) serves as "
            f"node {self.node_id}: this one ({self.instance}) stops"
        )
        self.session.give_up(reason)  # first: a clean DISCONNECT before the process may exit
        self._taken_over(reason)

    def _taken_over(self, reason: str) -> None:
        """Another process connected with this node's client id: the same node id twice."""
        message = (
            f"node {self.node_id}: {reason}. Another process runs with this node id (the other "
            "one keeps serving); give each node its own node_id"
        )
        logger.error("%s", message)
        if self.fatal is None:
            self.fatal = message
            self.fatal_status = EXIT_DUPLICATE
            self.on_fatal()

    def _stalled(self, pipeline: ModelPipeline, elapsed: float, deadline: float) -> None:
        self.reporter.report(
            ErrorKind.WATCHDOG,
            f"an inference call on {pipeline.info.name} has run {elapsed:.2f} s (deadline "
            f"{deadline:.2f} s); aborting it and rebuilding the backend",
        )

    def _stuck(self, pipeline: ModelPipeline, elapsed: float, deadline: float) -> None:
        reason = (
            f"an inference call on {pipeline.info.name} still runs {elapsed:.2f} s after the "
            f"watchdog aborted it (deadline {deadline:.2f} s); exiting for a restart"
        )
        self.reporter.report(ErrorKind.WATCHDOG, reason)
        if self.fatal is None:
            self.fatal = reason
            self.on_fatal()

    # -- share groups -----------------------------------------------------------------------

    def _leave_share_group(self, reason: str) -> None:
        """Say `stopping` and keep cutting until it comes back: the windows cut before it are
        this node's to serve (the drain below serves them), the ones after are another's."""
        self.session.publish(
            topics.node_status(self.node_id),
            self._status(NodeState.STOPPING, self.worker.pipeline, reason),
            retain=True,
        )
        deadline = time.monotonic() + SHARE_LEAVE_S
        while not self.ingest.share_leaving and time.monotonic() < deadline:
            if not self.session.is_connected:
                break  # the will tells the group; what is cut is served below
            time.sleep(0.02)

    def _on_node_status(self, message: mqtt.MQTTMessage) -> None:
        """Every node's retained status: the share group's members (and our own, below)."""
        node_id = topics.node_of(message.topic)
        if node_id is None:
            return
        if node_id == self.node_id:
            self._on_status(message)
        self.ingest.on_member_status(node_id, bytes(message.payload))

    # -- duplicate node ids -----------------------------------------------------------------

    def _on_status(self, message: mqtt.MQTTMessage) -> None:
        """Watch our own status topic for another live process with our node id.

        Both processes use the node's one client id, so the broker gives the session to the one
        that connected last and disconnects the other (which then stops: `_taken_over`). The
        newcomer finds the other's retained `online` birth (a crash or a clean stop leaves
        `offline` or `stopped`) and reports it; a birth from another process after ours (one
        that took our session while we still run) is reported too."""
        try:
            status = NodeStatus.model_validate_json(message.payload)
        except ValidationError:
            return
        if status.instance == self.instance:
            self._birth_seen = True
            return
        if status.state is not NodeState.ONLINE or status.instance in self._conflicts:
            return  # a previous run that crashed (offline) or stopped, or known already
        if self._birth_seen and _started_later(status, self.started_at, self.instance):
            self._give_way(status)
            return
        self._conflicts.add(status.instance)
        when = "is online" if self._birth_seen else "was online when this process connected"
        reason = (
            f"another process (instance {status.instance} on host {status.host}) {when} as "
            f"node {self.node_id}; the broker keeps one session per node id, so the process that "
            "connected last serves and the other stops (exit status 76). Give each node its own "
            "node_id"
        )
        logger.error("duplicate node id: %s", reason)
        self.reporter.report(ErrorKind.DUPLICATE_NODE_ID, reason, topic=message.topic)
        # assert our presence once, so the other process learns about us as well
        self.session.publish(
            topics.node_status(self.node_id),
            self._status(NodeState.ONLINE, self.worker.pipeline),
            retain=True,
        )
