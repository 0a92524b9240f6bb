"""One MQTT session on paho-mqtt 2.x's public API, with our own reconnect policy.

A named network thread drives the client's socket (`SocketPump`: paho's `loop()` on poll, so
any descriptor number works). It connects with exponential backoff and jitter (tenacity), waits
for the CONNACK, resubscribes every route on each connection and then calls the `on_connected`
hook (birth message, retained state). When the connection drops it goes back to connecting.
Handlers run on that thread and are isolated: an exception is logged with its topic and dispatch
goes on. Publishes from any thread are counted until acknowledged, so shutdown can
wait for every result to reach the broker.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from tenacity import Retrying, retry_if_exception_type, stop_when_event_set, wait_exponential_jitter

from common.mqtt.client import (
    Ack,
    ConnectRefusedError,
    SessionCounters,
    SessionSettings,
    no_ack,
    paho_client,
)
from common.mqtt.pump import SocketPump
from common.mqtt.refusals import Refusal, explain

logger = logging.getLogger(__name__)

Handler = Callable[[mqtt.MQTTMessage], None]
CONNACK_TIMEOUT_S = 10.0


@dataclass(slots=True)
class _Route:
    subscription: str
    handler: Handler
    qos: int


MAX_REFUSALS = 3
"""Refusals in a row that retrying cannot cure (bad login, untrusted certificate) before the
session gives up with the reason, instead of retrying forever."""
FLAP_S = 5.0
"""A connection that drops sooner than this after CONNACK counts as a flap: the next attempt
waits, longer each time (e.g. two processes taking one client id from each other)."""

SESSION_TAKEN_OVER = 142
"""MQTT 5 DISCONNECT reason: another connection with this client id took the session."""


class MqttSession:
    """A long-lived MQTT connection that reconnects on its own."""

    def __init__(
        self, settings: SessionSettings, on_connected: Callable[[], None] | None = None
    ) -> None:
        self.settings = settings
        self.counters = SessionCounters()
        self._connect_hooks: list[Callable[[], None]] = [on_connected] if on_connected else []
        self._routes: list[_Route] = []
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._connack = threading.Event()
        self._connack_code: ReasonCode | None = None
        self._pending = 0
        self._pending_cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._unsub_lock = threading.Lock()
        self._unsub_waiters: dict[int, threading.Event] = {}
        self._generation = 0
        """Counts successful connections: an acknowledgement is valid only on its own."""
        self._ack_lock = threading.Lock()
        self._published_hooks: list[Callable[[int], None]] = []
        self._taken_over_hooks: list[Callable[[str], None]] = []
        self.refusal: Refusal | None = None
        """The last failed connection, explained (common/mqtt/refusals.py)."""
        self.gave_up = threading.Event()
        """Set when a refusal that retrying cannot cure came `MAX_REFUSALS` times in a row."""
        self._permanent = 0
        self._gave_up_hooks: list[Callable[[str], None]] = []
        self.taken_over = threading.Event()
        """Set when another connection took this client id's session over (no reconnect)."""
        self.max_packet_size: int | None = None
        """The largest packet the broker takes, from its CONNACK (MQTT 5; None: not said)."""
        self._client = self._make_client()
        self._io = SocketPump(self._client)

    @property
    def protocol_is_v5(self) -> bool:
        """True on MQTT 5."""
        return self.settings.protocol == "5"

    @property
    def is_connected(self) -> bool:
        """True between a successful CONNACK and the next disconnect."""
        return self._connected.is_set()

    def is_alive(self) -> bool:
        """True while the network thread runs (or before it was started, or after `stop`/
        `give_up` ended it on purpose)."""
        return self._thread is None or self._thread.is_alive() or self._stop.is_set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (or timeout, or the session gave up); True when connected."""
        deadline = time.monotonic() + timeout
        while not self._connected.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self.gave_up.is_set() or time.monotonic() >= deadline:
                return False
        return True

    def connect(self, timeout: float = 10.0) -> None:
        """Start and wait for the broker; ConnectionError saying why when it does not come (a
        refusal explained: common/mqtt/refusals.py)."""
        self.start()
        if not self.wait_connected(timeout):
            reason = self.connect_error()
            self.stop()
            msg = f"cannot connect to {self.settings.address}: {reason}"
            raise ConnectionError(msg)

    def connect_error(self) -> str:
        """Why the session is not connected, as a person can act on it."""
        if self.refusal is not None:
            return str(self.refusal)
        return self.counters.last_error or f"no connection to {self.settings.address} yet"

    def on_gave_up(self, hook: Callable[[str], None]) -> None:
        """Call `hook(reason)` when the session stops retrying a refused connection."""
        self._gave_up_hooks.append(hook)

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Also call `hook` on the network thread after every connection (after resubscribing)."""
        self._connect_hooks.append(hook)

    def on_published(self, hook: Callable[[int], None]) -> None:
        """Also call `hook(mid)` on the network thread after each PUBACK (keep it quick)."""
        self._published_hooks.append(hook)

    def on_taken_over(self, hook: Callable[[str], None]) -> None:
        """Call `hook(reason)` when another connection takes this client id's session over."""
        self._taken_over_hooks.append(hook)

    def route(
        self,
        topic_filter: str,
        handler: Handler,
        *,
        qos: int = 1,
        share: str | None = None,
        deferred_ack: bool = False,
    ) -> None:
        """Deliver messages matching `topic_filter` to `handler` (subscribed on every connect).

        With `share`, the subscription is `$share/{share}/{topic_filter}` (MQTT 5 load sharing);
        messages still arrive on their real topics. With `manual_ack` sessions and
        `deferred_ack`, the handler takes the acknowledgement over (`ack_later`); otherwise the
        message is acknowledged when the handler returns.
        """
        subscription = f"$share/{share}/{topic_filter}" if share else topic_filter
        self._routes.append(_Route(subscription, handler, qos))
        self._client.message_callback_add(topic_filter, self._isolated(handler, deferred_ack))
        if self.is_connected:
            self._client.subscribe(subscription, qos=qos)

    def unroute(self, topic_filter: str, *, timeout: float = 2.0) -> bool:
        """Unsubscribe `topic_filter` and wait for the broker's UNSUBACK.

        The handler stays in place, so messages the broker sent before the UNSUBACK are still
        delivered. True when the UNSUBACK arrived (or there was no connection to unsubscribe on).
        """
        routes = [r for r in self._routes if r.subscription.endswith(topic_filter)]
        for route in routes:
            self._routes.remove(route)
        if not self.is_connected or not routes:
            return True
        done = threading.Event()
        with self._unsub_lock:
            for route in routes:
                _, mid = self._client.unsubscribe(route.subscription)
                if mid is not None:
                    self._unsub_waiters[mid] = done
        return done.wait(timeout)

    def start(self) -> None:
        """Start the network thread; returns at once (see `wait_connected`)."""
        self._thread = threading.Thread(
            target=self._run, name=f"mqtt[{self.settings.client_id}]", daemon=True
        )
        self._thread.start()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        content_type: str | None = None,
    ) -> bool:
        """Queue a message; False when it was dropped (queue full, or QoS 0 while offline)."""
        info = self.publish_message(
            topic, payload, qos=qos, retain=retain, content_type=content_type
        )
        return info is not None

    def publish_message(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        content_type: str | None = None,
    ) -> mqtt.MQTTMessageInfo | None:
        """Like `publish`, returning paho's handle (`is_published()`), or None when dropped."""
        properties = None
        if content_type and self.protocol_is_v5:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ContentType = content_type
        with self._pending_cv:
            self._pending += 1
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        queued = info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS or (
            info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN and qos > 0
        )
        if not queued:
            with self._pending_cv:  # publishers on several threads (inference workers)
                self.counters.publish_dropped += 1
            self._settle(1)
            return None
        return info

    def pending_publishes(self) -> int:
        """Messages handed to paho and not yet acknowledged (QoS 1) or written (QoS 0)."""
        with self._pending_cv:
            return self._pending

    def wait_published(self, timeout: float) -> bool:
        """Block until every publish is acknowledged; False on timeout, or at once when the
        session was taken over (no acknowledgement can come: this process never reconnects)."""
        with self._pending_cv:
            self._pending_cv.wait_for(
                lambda: self._pending <= 0 or self.taken_over.is_set(), timeout
            )
            return self._pending <= 0

    def wait_settled(self, timeout: float) -> None:
        """Block until some publish is acknowledged (or dropped), at most `timeout` seconds."""
        with self._pending_cv:
            self._pending_cv.wait(timeout)

    def stop(self, *, timeout: float = 5.0) -> None:
        """Disconnect cleanly (the broker discards the will) and join the network thread.

        A session kept for reconnects (`session_expiry_s`) ends here too: a clean stop leaves
        no subscribed session behind that would queue messages nobody takes.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        properties = None
        if self.protocol_is_v5 and self.settings.session_expiry_s:
            properties = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = 0
        try:
            self._client.disconnect(properties=properties)
            self._flush()  # the network thread is gone: write the DISCONNECT ourselves
        except (OSError, ValueError):  # socket already gone
            logger.debug("disconnect on a closed socket")
        self._connected.clear()
        if self._thread is None or not self._thread.is_alive():
            self._io.close()

    def _flush(self) -> None:
        """Write what paho has queued (only when the network thread is not writing)."""
        for _ in range(100):
            if not self._client.want_write():
                return
            if self._client.loop_write() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    # -- network thread -------------------------------------------------------------------

    def _run(self) -> None:
        first = True
        flaps = 0
        while not self._stop.is_set():
            if flaps:  # the last connection dropped soon after it began: do not hammer
                pause = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * 2**flaps)
                if self._stop.wait(pause * (0.5 + random.random())):
                    return
            try:
                for attempt in Retrying(
                    wait=wait_exponential_jitter(
                        multiplier=self.settings.backoff_initial_s,
                        max=self.settings.backoff_max_s,
                        jitter=self.settings.backoff_initial_s,
                    ),
                    retry=retry_if_exception_type((OSError, ConnectRefusedError, TimeoutError)),
                    stop=stop_when_event_set(self._stop),
                    before_sleep=self._log_retry,
                    reraise=True,
                ):
                    with attempt:
                        self._connect_once(first=first)
            except (OSError, ConnectRefusedError, TimeoutError):
                return  # stop requested while retrying
            first = False
            began = time.monotonic()
            self._pump()
            if self.taken_over.is_set():
                self._flush()
                return
            flaps = flaps + 1 if time.monotonic() - began < FLAP_S else 0

    def _connect_once(self, *, first: bool) -> None:
        if self._stop.is_set():  # gave up, or stopping: no further attempt
            msg = "stopping"
            raise TimeoutError(msg)
        self._connack.clear()
        address = self.settings.address
        if first:
            properties = None
            clean_start: bool | Literal[3] = mqtt.MQTT_CLEAN_START_FIRST_ONLY
            if self.protocol_is_v5 and self.settings.session_expiry_s:
                properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
                properties.SessionExpiryInterval = self.settings.session_expiry_s
                # Resume what the broker kept for this client id (a node's id is stable per
                # node, so a restarted node gets the windows queued while it was down); and
                # mosquitto (2.0) only saves a session begun with clean start 0 across its own
                # restart, with the QoS 1 messages queued for us.
                clean_start = False
            self._client.connect(
                address.host,
                address.port,
                self.settings.keepalive_s,
                clean_start=clean_start,
                properties=properties,
            )
        else:
            self._client.reconnect()
        deadline = time.monotonic() + CONNACK_TIMEOUT_S
        while not self._connack.is_set():
            rc = self._io.step(0.05)
            if self._connack.is_set():  # a refusal closes the line with its CONNACK
                break
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                msg = f"connection to {address} lost before CONNACK ({rc.name})"
                raise ConnectionError(msg)
            if time.monotonic() > deadline or self._stop.is_set():
                msg = f"no CONNACK from {address} within {CONNACK_TIMEOUT_S:.0f} s"
                raise TimeoutError(msg)
        code = self._connack_code
        if code is not None and code.is_failure:
            msg = f"broker {address} refused the connection: {code}"
            raise ConnectRefusedError(msg, code.value, str(code))

    def _pump(self) -> None:
        while not self._stop.is_set():
            rc = self._io.step(0.05)
            if rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
                logger.warning(
                    "connection to %s lost (%s); reconnecting", self.settings.address, rc.name
                )
                self._connected.clear()
                return

    def _log_retry(self, state: Any) -> None:
        outcome = state.outcome.exception() if state.outcome else None
        if outcome is None:
            return
        refusal = explain(outcome, self.settings)
        self.refusal = refusal
        self.counters.last_error = str(refusal)
        self._permanent = self._permanent + 1 if refusal.permanent else 0
        if self._permanent >= MAX_REFUSALS:
            self._give_up(f"{refusal} (refused {self._permanent} times in a row; not retrying)")
            return
        logger.warning(
            "cannot connect: %s; retry %d in %.1f s",
            refusal,
            state.attempt_number,
            state.upcoming_sleep,
        )

    def _give_up(self, reason: str) -> None:
        """Stop retrying a connection that cannot succeed as configured; tell the hooks."""
        logger.error("%s", reason)
        self.counters.last_error = reason
        self.gave_up.set()
        self._stop.set()
        for hook in self._gave_up_hooks:
            try:
                hook(reason)
            except Exception:
                logger.exception("on_gave_up hook failed")

    # -- paho callbacks (network thread) --------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = paho_client(self.settings)
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_publish = self._handle_publish
        client.on_socket_open = self._handle_socket_open
        # Only the network thread writes to the socket: a publish from another thread queues
        # the packet and wakes the loop (paho's external-loop mode, set up by `SocketPump`),
        # instead of writing itself while holding paho's message lock (two threads on one
        # socket; a lock-order deadlock with callbacks that publish).
        client.on_unsubscribe = self._handle_unsubscribe
        return client

    def _handle_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        try:  # Nagle's algorithm costs 20-40 ms of p95 latency (docs/architecture.md)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            logger.debug("TCP_NODELAY not available on this socket")

    def _handle_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, code: ReasonCode, properties: Any
    ) -> None:
        self._connack_code = code
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None)
        self._connack.set()
        if code.is_failure:
            self.counters.last_error = str(code)
            return
        self.counters.connects += 1
        self.counters.connected_since = time.time()
        with self._ack_lock:
            self._generation += 1
        for route in self._routes:
            client.subscribe(route.subscription, qos=route.qos)
        self._connected.set()
        logger.info("connected to %s as %s", self.settings.address, self.settings.client_id)
        for hook in self._connect_hooks:
            try:
                hook()
            except Exception:
                logger.exception("on_connected hook failed")

    def _handle_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, code: ReasonCode, properties: Any
    ) -> None:
        self._connected.clear()
        self.counters.disconnects += 1
        self.counters.connected_since = None
        if getattr(code, "value", None) == SESSION_TAKEN_OVER and not self._stop.is_set():
            reason = (
                f"another connection took over the session of client id "
                f"{self.settings.client_id!r}, or of this login on a broker that ties sessions to "
                "logins (MQTT 5 reason 142): not reconnecting, so that the two never take it "
                "from each other in a loop; give each process its own login"
            )
            self.counters.last_error = reason
            logger.error("%s", reason)
            self._stop.set()
            for hook in self._taken_over_hooks:  # before the event: whoever waits on it sees
                try:  # what the hooks did (a node's fatal status)
                    hook(reason)
                except Exception:
                    logger.exception("on_taken_over hook failed")
            self._mark_taken_over()
            return
        if not self._stop.is_set():
            self.counters.last_error = f"disconnected: {code}"
            logger.warning("disconnected from %s: %s", self.settings.address, code)

    def _handle_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, code: ReasonCode, properties: Any
    ) -> None:
        if getattr(code, "is_failure", False):
            self.counters.publish_refused += 1
            self.counters.last_error = f"publish refused by the broker: {code}"
            if self.counters.publish_refused in {1, 10, 100} or not (
                self.counters.publish_refused % 1000
            ):
                logger.error(
                    "the broker refused %d publishes so far (%s): check this client's ACL",
                    self.counters.publish_refused,
                    code,
                )
        self._settle(1)
        for hook in self._published_hooks:
            try:
                hook(mid)
            except Exception:
                logger.exception("on_published hook failed")

    def _handle_unsubscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, codes: Any, properties: Any
    ) -> None:
        with self._unsub_lock:
            waiter = self._unsub_waiters.pop(mid, None)
        if waiter is not None:
            waiter.set()

    def _mark_taken_over(self) -> None:
        self.taken_over.set()
        with self._pending_cv:
            self._pending_cv.notify_all()  # wait_published stops waiting for acks

    def _settle(self, count: int) -> None:
        with self._pending_cv:
            self._pending -= count
            self._pending_cv.notify_all()  # wait_published and wait_settled re-check

    def give_up(self, reason: str) -> None:
        """Stop reconnecting and drop the connection, for good: another process owns this
        client id's session (`taken_over` is set; `on_taken_over` hooks are not called)."""
        self.counters.last_error = reason
        self._mark_taken_over()
        self._stop.set()
        self._client.disconnect()  # a clean DISCONNECT (no will: the other process serves),
        # written by the network thread as it leaves `_pump` (not here: this may run inside a
        # paho callback, where writing would deadlock on paho's callback lock)

    def ack_later(self, message: mqtt.MQTTMessage) -> Ack:
        """The acknowledgement of `message`, to send when its work is safely done.

        Valid only on the connection the message arrived on: after a reconnect the broker
        re-sends what was not acknowledged (DUP), and that copy has its own acknowledgement."""
        if not self.settings.manual_ack or message.qos == 0:
            return no_ack
        generation, mid, qos = self._generation, message.mid, message.qos
        sent = False

        def ack() -> None:
            nonlocal sent
            with self._ack_lock:
                if sent or generation != self._generation or not self.is_connected:
                    sent = True
                    return
                sent = True
            self._client.ack(mid, qos)

        return ack

    def _isolated(
        self, handler: Handler, deferred_ack: bool = False
    ) -> Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]:
        auto_ack = self.settings.manual_ack and not deferred_ack

        def call(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            try:
                handler(message)
            except Exception:
                self.counters.handler_errors += 1
                logger.exception("handler for %s failed", message.topic)
            finally:
                if auto_ack and message.qos > 0:
                    client.ack(message.mid, message.qos)

        return call
