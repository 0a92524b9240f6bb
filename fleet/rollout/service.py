"""`imu-fleet controller`: a long-running service that drives every open rollout.

It renews the fleet's current signed desired states before they expire (fleet/rollout/renewal.py),
and it watches the retained rollout records and takes over each running or paused rollout that no
live controller drives: one whose controller's presence is gone (a killed `imu-fleet rollout`, a
`--detach`ed one, another service that died) or that stopped heart-beating. Several services may
run at once (one per site, or two for redundancy): the take-over epochs of the records decide
which one drives (fleet/rollout/records.py), the others keep their hands off.

Its own `/metrics` (and `/healthz`, open) are served on `--listen`, behind a bearer token unless
on loopback, as the node's and the dashboard's are.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from common.http import (
    LOOPBACK_NAMES,
    BackgroundServer,
    HttpLimits,
    Reply,
    TlsHandshakeHandler,
    bearer_matches,
    is_loopback,
    json_reply,
    parse_listen,
    read_token_file,
    send_reply,
    server_class,
)
from common.mqtt.connection import Connection
from fleet.rollout.controller import Controller, RolloutError
from fleet.rollout.renewal import RENEW_S, Renewer
from schemas.control import RolloutRecord, RolloutState

logger = logging.getLogger(__name__)

POLL_S = 1.0
"""How often the service looks for rollouts without a live controller."""
DEFAULT_LISTEN = "127.0.0.1:9109"


@dataclass
class ServiceStats:
    """What the service did since start (its /metrics)."""

    takeovers: int = 0
    finished: Counter[str] = field(default_factory=Counter)
    """Rollouts it drove to an end, by final state."""
    handed_over: int = 0
    """Rollouts another controller took from it."""


class ControllerService:
    """Drives open rollouts whose controller is gone; `run()` until `stop()`."""

    def __init__(
        self,
        broker: str | Connection,
        *,
        protocol: str = "5",
        name: str | None = None,
        sign_key: Path | None = None,
        trust_key: Path | None = None,
        poll_s: float = POLL_S,
        renew_s: float = RENEW_S,
    ) -> None:
        client_id = f"imu-fleet-controller-{name}" if name else None
        self.controller = Controller.connect(
            broker, protocol=protocol, client_id=client_id, sign_key=sign_key, trust_key=trust_key
        )
        self.poll_s = poll_s
        key = self.controller.signing_key
        self.renewer = (
            Renewer(self.controller.session, key, self.controller.desired, renew_s)
            if key is not None
            else None
        )
        """Keeps the current signed desired states from expiring (with a key only)."""
        self.stats = ServiceStats()
        self._driving: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    @property
    def controller_id(self) -> str:
        """This service's id, as rollout records name their controller."""
        return self.controller.controller_id

    def driving(self) -> list[str]:
        """Rollout ids this service drives now."""
        with self._lock:
            return [rid for rid, thread in self._driving.items() if thread.is_alive()]

    def run(self) -> None:
        """Look for rollouts to take over every `poll_s` until `stop()`."""
        logger.info("controller service %s watching for rollouts", self.controller_id)
        while not self._stop.wait(self.poll_s):
            for record in self.controller.records():
                if self._wants(record):
                    self._take(record)
            if self.renewer is not None:
                self.renewer.renew_due()

    def request_stop(self) -> None:
        """Make `run()` return (safe from a signal handler)."""
        self._stop.set()

    def close(self) -> None:
        """Withdraw the presence (another service takes over what this one drove) and
        disconnect."""
        self._stop.set()
        self.controller.close()

    def _wants(self, record: RolloutRecord) -> bool:
        if record.state not in (RolloutState.RUNNING, RolloutState.PAUSED):
            return False
        with self._lock:
            thread = self._driving.get(record.rollout_id)
            if thread is not None and thread.is_alive():
                return False
        return not self.controller.is_driven(record)

    def _take(self, record: RolloutRecord) -> None:
        command = take_over_command(record)
        logger.info(
            "%s has no live controller (was %s): taking it over",
            record.rollout_id,
            record.controller,
        )
        self.stats.takeovers += 1
        thread = threading.Thread(
            target=self._drive,
            args=(record, command),
            name=f"rollout-{record.rollout_id}",
            daemon=True,
        )
        with self._lock:
            self._driving[record.rollout_id] = thread
        thread.start()

    def _drive(self, record: RolloutRecord, command: str) -> None:
        try:
            final = self.controller.take_over(record, command)
            if final.state is RolloutState.PAUSED:  # keep it driven: heartbeats, and a resume
                final = self.controller.run(final)
        except RolloutError as exc:  # taken over by another controller, or refused
            self.stats.handed_over += 1
            logger.warning("%s: %s", record.rollout_id, exc)
            return
        except Exception:  # never let one rollout take the service down
            logger.exception("%s: driving it failed; the next poll may take it again", record)
            return
        self.stats.finished[final.state] += 1
        logger.info("%s ended %s (%s)", final.rollout_id, final.state, final.reason or "")


def take_over_command(record: RolloutRecord) -> str:
    """What a take-over does: an operator's abort or rollback the dead controller never carried
    out is carried out; otherwise the rollout goes on as its state says (running: resume;
    paused: stay paused, unless a resume was asked)."""
    if record.command in ("abort", "rollback"):
        return record.command
    if record.state is RolloutState.PAUSED and record.command != "resume":
        return "pause"
    if record.state is RolloutState.RUNNING and record.command == "pause":
        return "pause"
    return "resume"


class _ServiceCollector(Collector):
    def __init__(self, service: ControllerService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        service, stats = self.service, self.service.stats
        yield GaugeMetricFamily(
            "imu_fleet_controller_connected",
            "1 while connected to the broker",
            value=int(service.controller.session.is_connected),
        )
        yield GaugeMetricFamily(
            "imu_fleet_controller_rollouts_driving",
            "Rollouts this service drives now",
            value=len(service.driving()),
        )
        yield CounterMetricFamily(
            "imu_fleet_controller_takeovers",
            "Rollouts taken over from a gone controller",
            value=stats.takeovers,
        )
        yield CounterMetricFamily(
            "imu_fleet_controller_handed_over",
            "Rollouts another controller took from this one",
            value=stats.handed_over,
        )
        finished = CounterMetricFamily(
            "imu_fleet_controller_rollouts_finished",
            "Rollouts driven to an end, by final state",
            labels=["state"],
        )
        for state in RolloutState:
            finished.add_metric([state.value], stats.finished.get(state, 0))
        yield finished
        yield CounterMetricFamily(
            "imu_fleet_controller_desired_renewed",
            "Signed desired states issued again before they expired",
            value=service.renewer.renewed if service.renewer is not None else 0,
        )
        refused = GaugeMetricFamily(
            "imu_fleet_controller_refused_messages",
            "Retained rollout records and artifact manifests on the broker that no trusted fleet "
            "key signed: never acted on (a fleet login without the key, or an alteration)",
            labels=["kind"],
        )
        kinds = Counter(
            "record" if r.record is not None else "artifact"
            for r in service.controller.book.refused()
        )
        for kind in ("record", "artifact"):
            refused.add_metric([kind], kinds.get(kind, 0))
        yield refused
        records = GaugeMetricFamily(
            "imu_fleet_controller_rollouts",
            "Rollout records on the broker, by state",
            labels=["state"],
        )
        counts = Counter(r.state for r in service.controller.records())
        for state in RolloutState:
            records.add_metric([state.value], counts.get(state, 0))
        yield records


class ServiceHttp:
    """`/metrics` (bearer token unless open) and `/healthz` (open) on a thread."""

    def __init__(self, listen: str, service: ControllerService, token: str | None) -> None:
        host, port = parse_listen(listen)
        if token is None and not is_loopback(host):
            msg = (
                f"--listen {listen} reaches beyond this machine: give --token-file (a bearer "
                "token for /metrics)"
            )
            raise ValueError(msg)
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_ServiceCollector(service))
        server = server_class(host)((host, port), _handler(registry, service, token))
        server.limits = HttpLimits(allowed_hosts=LOOPBACK_NAMES if token is None else None)
        self._served = BackgroundServer(server, "controller-http")

    @property
    def address(self) -> tuple[str, int]:
        """Where it listens (the port resolved when 0 was asked)."""
        return self._served.address

    def start(self) -> None:
        """Serve in the background."""
        self._served.start()

    def stop(self) -> None:
        """Stop serving."""
        self._served.stop()


class _Handler(TlsHandshakeHandler, BaseHTTPRequestHandler):
    """GET /healthz (open) and /metrics (bearer token unless open)."""

    registry: CollectorRegistry
    service: ControllerService
    secret: bytes | None

    def do_GET(self) -> None:
        """Answer one GET."""
        reply: Reply
        if self.path == "/healthz":
            healthy = self.service.controller.session.is_connected
            status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
            reply = json_reply(
                status, {"broker_connected": healthy, "driving": self.service.driving()}
            )
        elif self.path != "/metrics":
            reply = json_reply(HTTPStatus.NOT_FOUND, {"error": "GET /metrics or /healthz"})
        elif self.secret is not None and not bearer_matches(
            self.headers.get("Authorization"), self.secret
        ):
            reply = json_reply(
                HTTPStatus.UNAUTHORIZED,
                {"error": "bearer token required"},
                **{"WWW-Authenticate": "Bearer"},
            )
        else:
            reply = Reply(HTTPStatus.OK, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        send_reply(self, reply)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests go to the debug log."""
        logger.debug("http %s %s", self.client_address[0], format % args)


def _handler(
    registry: CollectorRegistry, service: ControllerService, token: str | None
) -> type[_Handler]:
    """A handler class bound to this service (http.server makes one instance per request)."""
    attributes = {
        "registry": registry,
        "service": service,
        "secret": token.encode() if token else None,
    }
    return type("ServiceHandler", (_Handler,), attributes)


def serve(service: ControllerService, listen: str | None, token_file: Path | None) -> int:
    """Run the service (and its HTTP side) until `service.request_stop()`; returns 0."""
    token = read_token_file(token_file) if token_file else None
    http = ServiceHttp(listen, service, token) if listen else None
    if http is not None:
        http.start()
        host, port = http.address
        logger.info("controller metrics on http://%s:%d/metrics", host, port)
    started = time.monotonic()
    try:
        service.run()
    finally:
        if http is not None:
            http.stop()
        service.close()
        logger.info("controller service stopped after %.0f s", time.monotonic() - started)
    return 0
