"""Simulated inference nodes: N real MQTT clients in one process, running the node's ModelManager.

For tests and rollout measurements (`imu-fleet simulate nodes`). Each node has its own MQTT
connection, a retained `online` birth with its group, an `offline` will, telemetry, a retained
`stopped` status on a clean stop, and the real `ModelManager`, so every refusal (hash, signature,
version, expiry, size, shape, golden) is the node's own code. Shared, to fit 1,000 nodes:

* one cache folder, fetched into in single flight (each node still checks the file's sha256);
* one golden-checked ONNX Runtime session per bundle sha256 (refusals remembered likewise); each
  node gets its own `ModelPipeline` on it; the swap only replaces the node's reference;
* one network thread: an `MqttSession` per node would be a thread per node; one epoll loop
  drives them all here.

Sensors are not simulated: per telemetry interval a node counts one golden window, run once per
model version and round of telemetry on the shared session, so `windows_per_s` and latency count
that tiny load (`backend_reason` says so); RSS is the whole simulator process's.

A model version can be made to degrade once active (`degrade={"1.4.0": "errors"}`), for testing
health-gated rollouts: `errors` fails every window (reported as inference errors), `latency` adds
`DEGRADED_LATENCY_MS` to every latency it reports (added to the figure, not slept), `crash`
restarts the node every telemetry interval (offline, then a new instance from zero).
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import psutil

from common.bundle import DEFAULT_MAX_BUNDLE_BYTES as MAX_BUNDLE_BYTES
from common.bundle import read_bundle
from common.errors import EdgeError
from common.mqtt.address import BrokerAddress
from common.mqtt.connection import Connection
from common.signing import load_trust
from common.version import software_version
from fleet.pki.login import client_login
from fleet.simulate.netloop import LoopSession, NetLoop
from fleet.simulate.shared_models import SharedModels
from node.metrics import NodeMetrics
from node.reporting import ErrorReporter
from node.telemetry import latency_summary
from node.updates.fetch import FetchPolicy
from node.updates.manager import ManagerSettings, ModelManager
from runtime.backend import (
    FloatArray,
)
from runtime.pipeline import ModelPipeline
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel
from schemas.messages import ErrorKind, NodeState, NodeStatus, Telemetry

logger = logging.getLogger(__name__)

SIMULATED = "simulated node: no sensor input, one golden window per telemetry interval"
"""`backend_reason` in every simulated node's status and telemetry."""
STEP_S = 0.2
"""How often waiting loops look whether they were interrupted."""
STOP_WAIT_S = 10.0
"""How long stopping may wait for the nodes' model managers and last messages, in all."""
GIVE_UP_S = 60.0
"""`simulate nodes` exits when no node has reached the broker for this long."""
CONNECT_BATCH = 50
"""Nodes started at once before waiting for their CONNACKs."""
Degradation = Literal["errors", "latency", "crash"]
DEGRADED_LATENCY_MS = 80.0
"""What `latency` degradation adds to each reported latency (over the 50 ms target)."""
UPDATE_SLOTS = 4
"""Model updates under way at once in one simulator process. Each node's manager has a thread;
2,500 of them updating at once left the one network thread so little of the GIL that every node
of the site missed its keepalive mid-swap (bench.sites, 10,000 nodes). A real node is a process
of its own and updates alone."""


class _SimManager(ModelManager):
    """The node's own model manager, whose updates wait for one of the simulator's slots."""

    def __init__(self, slots: threading.Semaphore, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = slots

    def _update(self, desired: DesiredModel, key: tuple[str, str, str]) -> None:
        with self._slots:
            super()._update(desired, key)


class _SimNode:
    """One simulated node: its session, its model manager and the pipeline it serves."""

    def __init__(self, node_id: str, group: str, fleet: SimulatedFleet, net: NetLoop) -> None:
        self.node_id, self.group, self.site = node_id, group, fleet.site
        self.degrade = fleet.degrade
        self.pipeline = fleet.models.load(fleet.initial)
        self.instance = uuid.uuid4().hex[:12]
        self.metrics = NodeMetrics()
        will = (topics.node_status(node_id), self.status(NodeState.OFFLINE, "connection lost"))
        settings = fleet.login(node_id).session_settings(
            f"{node_id}-{self.instance[:6]}", will=will
        )
        self.session = LoopSession(settings, net, node_id, self._announce)
        self.reporter = ErrorReporter(node_id, self._publish_qos1, self.metrics)
        self.manager = _SimManager(
            fleet.update_slots,
            ManagerSettings(
                node_id,
                group,
                fleet.cache_dir,
                MAX_BUNDLE_BYTES,
                fleet.trusted,
                fetch_policy=fleet.fetch_policy,
            ),
            session=self.session,
            reporter=self.reporter,
            loader=fleet.models.load,
            swap=self._swap,
            active=self.pipeline,
            fetch=fleet.models.fetch,
        )

    def status(self, state: NodeState, reason: str | None = None) -> bytes:
        """A NodeStatus payload for this node."""
        return encode(
            NodeStatus(
                state=state,
                node_id=self.node_id,
                instance=self.instance,
                ts=time.time(),
                software_version=software_version(),
                backend=self.pipeline.info.name,
                backend_reason=SIMULATED,
                model=self.pipeline.ref,
                group=self.group,
                site=self.site,
                host=socket.gethostname(),
                reason=reason,
            )
        )

    def _announce(self) -> None:
        """On every connection: retained birth and model state (network thread)."""
        topic = topics.node_status(self.node_id)
        self.session.publish(topic, self.status(NodeState.ONLINE), retain=True)
        self.manager.publish_state()

    def _crash(self) -> None:
        """Die and come back as a new process would: offline (the will), then a new instance
        from zero with its birth."""
        topic = topics.node_status(self.node_id)
        self.session.publish(topic, self.status(NodeState.OFFLINE, "simulated crash"), retain=True)
        self.instance = uuid.uuid4().hex[:12]
        self.metrics.reset()
        self._announce()

    def _publish_qos1(self, topic: str, payload: bytes) -> bool:
        return self.session.publish(topic, payload, qos=1)

    def _swap(self, pipeline: ModelPipeline) -> ModelPipeline:
        old, self.pipeline = self.pipeline, pipeline
        return old

    def telemetry(
        self, window: FloatArray, rss_mb: float, peak_mb: float, measured: dict[str, float]
    ) -> Telemetry:
        """Report the interval, with one golden window through the served version: run on this
        node's pipeline unless another node ran that version this round (`measured`: "name
        version" -> latency ms; the session is shared per version, so the figure is the same)."""
        pipeline, started = self.pipeline, time.perf_counter()
        degraded = self.degrade.get(pipeline.ref.version)
        if degraded == "crash":
            self._crash()
        self.metrics.window_accepted()
        try:
            if degraded == "errors":
                msg = f"simulated: {pipeline.ref.version} fails every window"
                raise EdgeError(msg)
            served = f"{pipeline.ref.name} {pipeline.ref.version}"
            if (latency_ms := measured.get(served)) is None:
                pipeline.run(window)
                latency_ms = measured[served] = (time.perf_counter() - started) * 1e3
        except EdgeError as exc:
            self.reporter.report(ErrorKind.INFERENCE, f"golden window failed: {exc}")
        else:
            if degraded == "latency":
                latency_ms += DEGRADED_LATENCY_MS
            self.metrics.batch_done(1, [latency_ms], 0)
        interval = self.metrics.take_interval()
        windows_in, done, published, dropped, errors = self.metrics.totals()
        return Telemetry(
            node_id=self.node_id,
            ts=time.time(),
            interval_s=round(interval.seconds, 3),
            uptime_s=round(time.monotonic() - self.metrics.started, 3),
            backend=pipeline.info.name,
            backend_reason=SIMULATED,
            model=pipeline.ref,
            windows_in=windows_in,
            windows_done=done,
            results_published=published,
            windows_per_s=round(interval.windows_done / max(interval.seconds, 1e-9), 3),
            latency_ms=latency_summary(interval.latencies_ms),
            batch_mean=1.0 if interval.windows_done else None,
            queue_depth=0,
            queue_capacity=0,
            dropped=dropped,
            errors=errors,
            cpu_percent=None,
            rss_mb=rss_mb,
            peak_rss_mb=peak_mb,
            temperature_c=None,
        )


class SimulatedFleet:
    """`count` nodes `{prefix}-0000`, ... spread over groups `{prefix}-g0`, ... round robin.

    Call `stop()` after `start()`, also when `start()` raised.
    """

    def __init__(
        self,
        broker: str,
        bundle: Path,
        *,
        count: int,
        prefix: str = "sim",
        groups: int = 1,
        cache_dir: Path | None = None,
        telemetry_interval_s: float = 5.0,
        protocol: str = "5",
        trust_key: Path | None = None,
        file_url_root: Path | None = None,
        degrade: dict[str, Degradation] | None = None,
        node_credentials: Path | None = None,
        site: str | None = None,
    ) -> None:
        if count < 1 or groups < 1 or telemetry_interval_s <= 0:
            msg = "need count >= 1, groups >= 1 and telemetry_interval_s > 0"
            raise ValueError(msg)
        self.broker, self.address, self.protocol = broker, BrokerAddress.parse(broker), protocol
        self.node_credentials = node_credentials
        """On a secured site: the folder with each node's `node-ID.crt`/`.key` (and `ca.crt`)
        that `imu-fleet pki add site/ node ID` wrote; each simulated node logs in as itself."""
        self.site = site
        """The site every node names in its status (a site broker bridged to the fleet's)."""
        self.node_ids = [f"{prefix}-{i:04d}" for i in range(count)]
        self.groups = [f"{prefix}-g{k}" for k in range(groups)]
        self.trusted = load_trust(trust_key) if trust_key else None
        self.fetch_policy = FetchPolicy(file_root=file_url_root)
        self.initial = read_bundle(bundle, trust=self.trusted)
        self._temp: tempfile.TemporaryDirectory[str] | None = None
        if cache_dir is None:
            self._temp = tempfile.TemporaryDirectory(prefix="imu-sim-cache-")
        self.cache_dir = cache_dir or Path(self._temp.name)  # type: ignore[union-attr]
        self.models = SharedModels()
        self.update_slots = threading.Semaphore(UPDATE_SLOTS)
        self.degrade: dict[str, Degradation] = dict(degrade or {})
        """Model version -> how a node serving it degrades (tests of health gates)."""
        self._interval = telemetry_interval_s
        self._window: FloatArray = self.initial.golden()[0][:1]
        self._nodes: list[_SimNode] = []
        self._net: NetLoop | None = None
        self._stopped = threading.Event()
        self._interrupted = threading.Event()
        self._telemetry = threading.Thread(target=self._telemetry_loop, daemon=True)

    def login(self, node_id: str) -> Connection:
        """How node `node_id` logs in: as itself with its certificate, or (an open test broker)
        anonymously."""
        if self.node_credentials is None:
            return Connection(self.address, self.protocol)
        return client_login(
            Connection(self.address, self.protocol), f"node-{node_id}", self.node_credentials
        )

    def start(
        self, progress: Callable[[int, int], None] | None = None, timeout_s: float = 120.0
    ) -> None:
        """Start and connect every node, in batches; returns once all are connected."""
        count = len(self.node_ids)
        raise_open_files(count + 256)
        started = time.monotonic()
        net = self._net = NetLoop(self.address)
        for first in range(0, count, CONNECT_BATCH):
            ids = self.node_ids[first : first + CONNECT_BATCH]
            batch = [
                _SimNode(n, self.groups[i % len(self.groups)], self, net)
                for i, n in enumerate(ids, first)
            ]
            self._nodes.extend(batch)
            for node in batch:
                node.manager.attach()
                node.session.start()
            for node in batch:
                while not node.session.wait_connected(STEP_S):
                    if self._interrupted.is_set():
                        return
                    if time.monotonic() > started + timeout_s:
                        done = sum(n.session.is_connected for n in self._nodes)
                        msg = (
                            f"{done}/{count} nodes connected to {self.broker} after {timeout_s:g} s"
                        )
                        raise TimeoutError(msg)
            if progress is not None:
                progress(len(self._nodes), count)
        self._telemetry.start()
        logger.info("%d simulated nodes connected in %.2f s", count, time.monotonic() - started)

    def versions(self) -> dict[str, int]:
        """Active model version -> how many nodes serve it."""
        return dict(Counter(node.pipeline.ref.version for node in self._nodes))

    @property
    def interrupted(self) -> bool:
        """True once `interrupt()` was called."""
        return self._interrupted.is_set()

    def interrupt(self) -> None:
        """Make `start` and `run_for` return at once (a signal handler may call this)."""
        self._interrupted.set()

    def run_for(self, seconds: float | None, give_up_s: float | None = None) -> str | None:
        """Serve for `seconds` (None: until `stop()` or `interrupt()`), logging version counts as
        they change. With `give_up_s`, return early when no node has been connected for that
        long (a broker that stays gone): the reason, else None."""
        end = None if seconds is None else time.monotonic() + seconds
        last: dict[str, int] = {}
        last_connected = time.monotonic()
        while not self._stopped.is_set() and not self._interrupted.is_set():
            if (current := self.versions()) != last:
                logger.info("active versions: %s", current)
                last = current
            if any(node.session.is_connected for node in self._nodes):
                last_connected = time.monotonic()
            elif give_up_s is not None and time.monotonic() - last_connected > give_up_s:
                return f"no node has reached {self.broker} for {give_up_s:g} s: giving up"
            left = 1.0 if end is None else min(1.0, end - time.monotonic())
            if left <= 0 or self._interrupted.wait(left):
                return None
        return None

    def stop(self, reason: str = "stopped") -> None:
        """Retained `stopped` status from every node, then clean disconnects (idempotent)."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._telemetry.is_alive():
            self._telemetry.join(5)
        deadline = time.monotonic() + STOP_WAIT_S
        for node in self._nodes:  # all at once: a fetch in progress may hold one for a while
            node.manager.request_stop()
        for node in self._nodes:
            node.manager.stop(max(0.0, deadline - time.monotonic()))
            if node.session.is_connected:
                payload = node.status(NodeState.STOPPED, reason)
                node.session.publish(topics.node_status(node.node_id), payload, retain=True)
        deadline = time.monotonic() + 10.0
        for node in self._nodes:
            node.session.wait_published(max(0.0, deadline - time.monotonic()))
            node.session.request_stop()
        for node in self._nodes:
            node.session.closed.wait(max(0.0, deadline - time.monotonic()))
        if self._net is not None:
            self._net.close()
        self.models.close()
        if self._temp is not None:
            self._temp.cleanup()
        logger.info("%d simulated nodes stopped (%s)", len(self._nodes), reason)

    def _telemetry_loop(self) -> None:
        """One telemetry message per node per interval, spread evenly over the interval. Each
        node has its slot in the interval; a loop that falls behind (a busy process) does not
        sleep until it has caught up, so the rounds keep to the interval while the work fits."""
        gap, process = self._interval / len(self._nodes), psutil.Process()
        for node in self._nodes:
            node.metrics.take_interval()  # the first message covers a whole interval
        due = time.monotonic() + self._interval - gap
        while True:
            measured: dict[str, float] = {}  # one golden run per version per round
            rss_mb = round(process.memory_info().rss / 2**20, 1)  # the process's: once a round
            peak_mb = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            for node in self._nodes:
                if self._stopped.wait(max(0.0, due - time.monotonic())):
                    return
                due += gap
                payload = encode(node.telemetry(self._window, rss_mb, peak_mb, measured))
                node.session.publish(topics.node_telemetry(node.node_id), payload, qos=0)
            due = max(due, time.monotonic())  # a round that overran: the next starts now


def raise_open_files(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE towards `needed` (a socket per node plus headroom)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    logger.info("raised the open-file limit from %d to %d (hard limit %d)", soft, target, hard)


def simulate_nodes(
    broker: str,
    bundle: Path,
    count: int,
    *,
    prefix: str = "sim",
    groups: int = 1,
    cache_dir: Path | None = None,
    telemetry_interval_s: float = 5.0,
    protocol: str = "5",
    trust_key: Path | None = None,
    duration: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    degrade: dict[str, Degradation] | None = None,
    give_up_s: float | None = GIVE_UP_S,
    node_credentials: Path | None = None,
    site: str | None = None,
) -> int:
    """`imu-fleet simulate nodes`: run `count` nodes for `duration` s (None: until SIGINT or
    SIGTERM, which stop them cleanly within about `STOP_WAIT_S`; a second signal exits at once).
    Exit status 1 when the broker stayed gone for `give_up_s`."""
    fleet = SimulatedFleet(
        broker,
        bundle,
        count=count,
        prefix=prefix,
        groups=groups,
        cache_dir=cache_dir,
        telemetry_interval_s=telemetry_interval_s,
        protocol=protocol,
        trust_key=trust_key,
        degrade=degrade,
        node_credentials=node_credentials,
        site=site,
    )
    signals = _stop_on_signals(fleet)
    gave_up = None
    try:
        fleet.start(progress)
        gave_up = fleet.run_for(duration, give_up_s)
    finally:
        fleet.stop("interrupted" if fleet.interrupted else gave_up or "stopped")
        for number, previous in signals.items():
            signal.signal(number, previous)
    if gave_up is not None:
        logger.error("%s", gave_up)
        return 1
    return 0


def _stop_on_signals(fleet: SimulatedFleet) -> dict[int, Any]:
    """SIGINT and SIGTERM interrupt the fleet (it then stops cleanly); a second one exits at
    once. Returns the handlers they replaced (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handle(number: int, _frame: object) -> None:
        if fleet.interrupted:
            os._exit(128 + number)
        logger.info("signal %d: stopping the simulated nodes (again to exit at once)", number)
        fleet.interrupt()

    return {number: signal.signal(number, handle) for number in (signal.SIGINT, signal.SIGTERM)}
