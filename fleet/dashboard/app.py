"""One dashboard process: an MQTT session feeding the view, the event hub, the HTTP server."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from common.http import parse_listen, read_token_file, server_tls_context
from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from fleet.dashboard.auth import Gate, check_listen
from fleet.dashboard.events import Hub
from fleet.dashboard.metrics import DashboardCollector, metrics_registry, render
from fleet.dashboard.server import DashboardHttp
from fleet.dashboard.view import SUBSCRIPTIONS, DashboardView, Limits

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:8090"


@dataclass(frozen=True, slots=True)
class DashboardSettings:
    """What `imu-fleet dashboard` is told."""

    connection: Connection
    listen: str = DEFAULT_LISTEN
    token_file: Path | None = None
    metrics_token_file: Path | None = None
    """The scrape role's token: it opens /metrics only (the page token opens /metrics too)."""
    open: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)
    max_clients: int = 32
    tick_s: float = 0.2


class Dashboard:
    """The running pieces; `start`, then `stop`."""

    def __init__(self, settings: DashboardSettings) -> None:
        host, port = parse_listen(settings.listen)
        token = read_token_file(settings.token_file) if settings.token_file else None
        check_listen(host, token=token is not None, open_=settings.open)
        if (settings.tls_cert is None) != (settings.tls_key is None):
            msg = "--tls-cert and --tls-key go together: give both or neither"
            raise ValueError(msg)
        tls = None
        if settings.tls_cert is not None and settings.tls_key is not None:
            tls = server_tls_context(settings.tls_cert, settings.tls_key)
        self.settings = settings
        self.view = DashboardView(settings.limits)
        self.hub = Hub(self.view, max_clients=settings.max_clients, tick_s=settings.tick_s)
        client_id = f"dashboard-{uuid.uuid4().hex[:10]}"
        self.session = MqttSession(settings.connection.session_settings(client_id))
        for topic_filter in SUBSCRIPTIONS:
            self.session.route(topic_filter, self._on_message, qos=1)
        registry = metrics_registry(
            DashboardCollector(self.view, lambda: self.hub.clients, self._connected)
        )
        self.http = DashboardHttp(
            (host, port),
            self.hub,
            Gate(token.encode() if token else None, secure_cookie=tls is not None),
            metrics=lambda: render(registry),
            metrics_token=(
                read_token_file(settings.metrics_token_file, "--metrics-token-file").encode()
                if settings.metrics_token_file
                else None
            ),
            health=self._health,
            tls=tls,
        )
        self.started = time.time()

    def _connected(self) -> bool:
        return self.session.is_connected

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        self.view.ingest(message.topic, bytes(message.payload), retained=message.retain)

    def _health(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "broker_connected": self.session.is_connected,
            "uptime_s": round(time.time() - self.started, 1),
            "pages": self.hub.clients,
            **self.view.sizes(),
        }

    def start(self) -> None:
        """Connect (in the background, reconnecting on its own), push, serve."""
        self.session.start()
        self.hub.start()
        self.http.start()

    def stop(self) -> None:
        """Stop serving, end the streams, disconnect."""
        self.http.closing.set()
        self.hub.stop()
        self.http.stop()
        self.session.stop()


def run(settings: DashboardSettings) -> int:
    """Run until SIGINT or SIGTERM; returns the exit code."""
    dashboard = Dashboard(settings)
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    dashboard.start()
    logger.info(
        "dashboard of %s on %s (pid %d); Ctrl-C to stop",
        settings.connection,
        dashboard.http.url,
        os.getpid(),
    )
    if not dashboard.http.gate.open:
        link = f"{dashboard.http.url}?code={dashboard.http.gate.new_link()}"
        logger.warning(  # for the person who started it: it works once, within five minutes
            "open %s (once, within 5 minutes; more with `imu-fleet dashboard-link`)", link
        )
    if not dashboard.session.wait_connected(10):
        logger.warning("no broker connection yet (%s): retrying", settings.connection.address)
    done.wait()
    dashboard.stop()
    return 0
