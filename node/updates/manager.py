"""The node's model manager: follow the desired state, fetch, verify, load, warm, prove, swap.

Desired state comes from three retained topics; the most specific set one wins (node, group,
fleet), and an empty retained message clears an override. Handlers only record what arrived; a
named thread does the work, so the network thread never blocks. Each step is reported on the
retained `fleet/nodes/{id}/model`. Refusals (bad hash, bad or missing signature, an older
version without a signed rollback, an expired manifest, over the size limit, wrong shapes, a
golden mismatch) are reported there and on the errors topic, and the active model keeps serving.
Desired state is declarative: a target already serving, or the very message already handled (a
retained replay on reconnect), changes nothing; a refused target is retried only when the fleet
issues a new desired-state message for it. Before a message counts at all, the DesiredGuard
(node/updates/desired_guard.py) checks its signature, scope, expiry and freshness; a refused one
changes nothing. The model state names the desired state followed (`following`), so a pin is
visible. The manager thread survives any failure of one update (it is reported), and
`is_alive()` lets the node's readiness see a thread that died anyway.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paho.mqtt.client as mqtt

from common.bundle import Bundle, read_bundle, sha256_hex
from common.errors import EdgeError
from common.mqtt.session import MqttSession
from common.signing import Trust, load_trust, trust_store, verify_desired
from node.config import NodeConfig, default_state_dir
from node.reporting import ErrorReporter
from node.supervisor import thread_running
from node.updates.desired_guard import (
    FRESH_S,
    LEVELS,
    DesiredGuard,
    DesiredRefusedError,
    Scope,
    parse_desired,
)
from node.updates.fetch import FetchPolicy, add_to_cache, fetch_bundle
from node.updates.freshness import CHECK_S as FRESHNESS_CHECK_S
from node.updates.freshness import Freshness
from node.updates.last_served import remember_active
from node.updates.versions import is_older
from runtime.pipeline import ModelPipeline
from schemas import topics
from schemas.codec import encode
from schemas.control import DesiredModel
from schemas.messages import ErrorKind, FollowedDesired, ModelLifecycle, ModelRef, NodeModelState

logger = logging.getLogger(__name__)

Loader = Callable[[Bundle], ModelPipeline]
"""Open, warm up and golden-check a bundle on this node's backend (raises EdgeError)."""
Swap = Callable[[ModelPipeline], ModelPipeline]
"""Serve a new model from the next batch on; returns the one it replaces."""


class Fetch(Protocol):
    """A verified local copy of a desired bundle: `fetch_bundle`, or a wrapper around it."""

    def __call__(
        self,
        desired: DesiredModel,
        session: MqttSession,
        cache_dir: Path,
        *,
        max_bytes: int,
        timeout_s: float = ...,
        policy: FetchPolicy | None = ...,
    ) -> Path:
        """Fetch (or find in the cache), check size and sha256, return the cached path."""


class RefusedError(EdgeError):
    """A desired model this node will not run; the reason says why."""


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    """What the manager needs from the node's configuration."""

    node_id: str
    group: str
    cache_dir: Path
    max_bundle_bytes: int
    trusted_key: Trust | None = None
    fetch_timeout_s: float = 120.0
    state_file: Path | None = None
    """Where the desired-state history survives restarts (None: memory only)."""
    fetch_policy: FetchPolicy | None = None
    desired_fresh_s: float = FRESH_S
    """A signed desired state on a topic this node has no record of is taken only when issued
    within this many seconds."""

    @classmethod
    def for_node(cls, config: NodeConfig, node_id: str) -> ManagerSettings:
        """The settings a node's configuration gives (the trusted keys are read here)."""
        return cls(
            node_id=node_id,
            group=config.group,
            cache_dir=config.cache_dir,
            max_bundle_bytes=config.max_bundle_bytes,
            trusted_key=load_trust(config.trust_key) if config.trust_key else None,
            state_file=(config.state_dir or default_state_dir(node_id)) / "desired-history.json",
            fetch_timeout_s=config.fetch_timeout_s,
            fetch_policy=FetchPolicy(
                file_root=config.file_url_root, total_timeout_s=config.fetch_timeout_s
            ),
            desired_fresh_s=config.desired_fresh_s,
        )


class ModelManager:
    """Owns which model version serves, and reports it."""

    def __init__(
        self,
        settings: ManagerSettings,
        *,
        session: MqttSession,
        reporter: ErrorReporter,
        loader: Loader,
        swap: Swap,
        active: ModelPipeline,
        fetch: Fetch = fetch_bundle,
    ) -> None:
        self.settings = settings
        self._session = session
        self._reporter = reporter
        self._loader = loader
        self._swap = swap
        self._fetch = fetch  # simulated fleets share one cache and fetch once per version
        self._active = active
        self._previous: ModelPipeline | None = None
        self._lock = threading.Lock()
        self._desired: dict[str, DesiredModel | None] = dict.fromkeys(LEVELS)
        trusted = settings.trusted_key
        self._guard = DesiredGuard(
            trust_store(trusted) if trusted is not None else None,
            settings.state_file,
            fresh_s=settings.desired_fresh_s,
        )
        self._freshness = Freshness()
        self._active_key, self._active_size = self._remember(active)
        self._last_desired: DesiredModel | None = None
        self._state = self._report(ModelLifecycle.ACTIVE, publish=False)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)

    # -- wiring -----------------------------------------------------------------------------

    def attach(self) -> None:
        """Follow the three desired-state topics (routes survive reconnects) and start."""
        for level in LEVELS:
            topic = self._scope(level).topic
            self._session.route(topic, self._handler(level, topic))
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the manager thread to stop, without waiting (see `stop`)."""
        self._stop.set()
        self._wake.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the manager thread (an update in progress finishes first, within `timeout`)."""
        self.request_stop()
        self._thread.join(timeout)
        if self._previous is not None:
            self._previous.close()
            self._previous = None

    def publish_state(self) -> None:
        """(Re)publish the retained model state, e.g. after a reconnect."""
        self._session.publish(
            topics.node_model(self.settings.node_id), encode(self._state), retain=True
        )

    def adopt(self, pipeline: ModelPipeline) -> None:
        """The node replaced the serving pipeline itself (same model, e.g. a backend fallback)."""
        self._active = pipeline
        self._report(ModelLifecycle.ACTIVE)

    @property
    def state(self) -> NodeModelState:
        """The last reported model state."""
        return self._state

    def is_alive(self) -> bool:
        """True while the manager thread runs (or was never started)."""
        return thread_running(self._thread)

    # -- desired state ----------------------------------------------------------------------

    def _scope(self, level: str) -> Scope:
        return Scope.of(level, self.settings.group, self.settings.node_id)

    def _handler(self, level: str, topic: str) -> Callable[[mqtt.MQTTMessage], None]:
        def on_desired(message: mqtt.MQTTMessage) -> None:
            try:
                desired = parse_desired(message.payload)  # empty: clears this level
            except ValueError as exc:
                self._reporter.report(ErrorKind.INVALID, str(exc), topic=topic)
                return
            try:
                desired = self._guard.admit(self._scope(level), desired, bytes(message.payload))
            except DesiredRefusedError as exc:
                logger.error("desired state on %s refused: %s", topic, exc)
                self._reporter.report(ErrorKind.DESIRED_REFUSED, str(exc), topic=topic)
                if exc.stale:
                    with self._lock:
                        self._freshness.refused(level, str(exc))
                    self._wake.set()
                return
            with self._lock:
                self._desired[level] = desired
                self._freshness.admitted(level)
            self._wake.set()

        return on_desired

    def effective(self) -> DesiredModel | None:
        """The most specific desired state that is set."""
        followed = self._followed()
        return followed[1] if followed else None

    def _followed(self) -> tuple[str, DesiredModel] | None:
        with self._lock:
            return self._followed_unlocked()

    def _followed_unlocked(self) -> tuple[str, DesiredModel] | None:
        return next(
            ((level, d) for level in LEVELS if (d := self._desired[level]) is not None), None
        )

    def _following(self) -> FollowedDesired | None:
        followed = self._followed()
        if followed is None:
            return None
        level, desired = followed
        return FollowedDesired(
            scope=level,  # type: ignore[arg-type]
            target=self._scope(level).target,
            name=desired.name,
            version=desired.version,
            issued_at=desired.issued_at,
            rollout_id=desired.rollout_id,
            key_id=desired.key_id if desired.signature else None,
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(FRESHNESS_CHECK_S)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._check_freshness()
            desired = self.effective()
            if desired is None:
                self._report_following()
                continue
            key = (desired.name, desired.version, desired.bundle_sha256)
            if key == self._active_key or desired == self._last_desired:
                self._report_following()  # declarative: nothing to do, but say what is followed
                continue
            self._last_desired = desired
            try:
                self._update(desired, key)
            except Exception as exc:  # one bad update must not end the thread (MemoryError too)
                logger.exception("model update for %s %s failed", desired.name, desired.version)
                self._refuse(desired.ref, RefusedError(f"update failed unexpectedly: {exc!r}"))

    def _check_freshness(self) -> None:
        """Report a control plane that turned stale (once), and any change of it in the state."""
        with self._lock:
            before = self._freshness.since
            turned = self._freshness.update(self._followed_unlocked())
            changed = before != self._freshness.since
        if turned:
            reason = self._freshness.reason or "stale"
            logger.error("control plane stale: %s", reason)
            self._reporter.report(
                ErrorKind.CONTROL_PLANE_STALE,
                reason,
                topic=topics.node_model(self.settings.node_id),
            )
        if changed:
            self._report(self._state.state, target=self._state.target, error=self._state.last_error)

    def _report_following(self) -> None:
        if self._state.following != self._following():
            self._report(self._state.state, target=self._state.target, error=self._state.last_error)

    # -- one update -------------------------------------------------------------------------

    def _update(self, desired: DesiredModel, key: tuple[str, str, str]) -> None:
        target = desired.ref
        started = time.monotonic()
        try:
            self._report(ModelLifecycle.DOWNLOADING, target=target)
            path = self._fetch(
                desired,
                self._session,
                self.settings.cache_dir,
                max_bytes=self.settings.max_bundle_bytes,
                timeout_s=self.settings.fetch_timeout_s,
                policy=self.settings.fetch_policy,
            )
            self._report(ModelLifecycle.VERIFYING, target=target)
            bundle = read_bundle(  # the signature is checked before the files are read
                path, max_bytes=self.settings.max_bundle_bytes, trust=self.settings.trusted_key
            )
            self._verify(desired, bundle)
            self._report(ModelLifecycle.WARMING, target=target)
            pipeline = self._loader(bundle)  # contract, warm-up and golden check
        except EdgeError as exc:
            self._refuse(target, exc)
            return
        old = self._swap(pipeline)
        if self._previous is not None:
            self._previous.close()
        self._previous, self._active, self._active_key = old, pipeline, key
        self._active_size = desired.bundle_size
        if (
            self.settings.state_file is not None
        ):  # a restart starts from it (node/updates/startup.py)
            remember_active(self.settings.state_file.parent, path)
        self._report(ModelLifecycle.ACTIVE)
        logger.info(
            "now serving %s %s (was %s %s), update took %.2f s",
            target.name,
            target.version,
            old.ref.name,
            old.ref.version,
            time.monotonic() - started,
        )

    def _verify(self, desired: DesiredModel, bundle: Bundle) -> None:
        manifest = bundle.manifest
        if (manifest.name, manifest.version) != (desired.name, desired.version):
            msg = f"bundle is {manifest.name} {manifest.version}, not the desired one"
            raise RefusedError(msg)
        trusted = self.settings.trusted_key
        if manifest.expires_at is not None and _parse_time(manifest.expires_at) < time.time():
            msg = f"{manifest.name} {manifest.version} expired at {manifest.expires_at}"
            raise RefusedError(msg)
        current = self._active.ref
        if manifest.name == current.name and is_older(manifest.version, current.version):
            if not desired.rollback:
                msg = (
                    f"{manifest.version} is older than the active {current.version}; a downgrade "
                    "needs a rollback desired state signed by the fleet"
                )
                raise RefusedError(msg)
            if trusted is not None:
                verify_desired(desired, trusted)

    def _refuse(self, target: ModelRef, exc: EdgeError) -> None:
        reason = str(exc)
        logger.error("refused %s %s: %s", target.name, target.version, reason)
        self._report(ModelLifecycle.FAILED, target=target, error=reason)
        self._reporter.report(
            ErrorKind.MODEL,
            f"{target.name} {target.version} refused: {reason}",
            topic=topics.node_model(self.settings.node_id),
        )

    def _report(
        self,
        state: ModelLifecycle,
        *,
        target: ModelRef | None = None,
        error: str | None = None,
        publish: bool = True,
    ) -> NodeModelState:
        previous = self._previous.ref if self._previous is not None else None
        self._state = NodeModelState(
            node_id=self.settings.node_id,
            ts=time.time(),
            state=state,
            active=self._active.ref,
            previous=previous,
            target=target,
            backend=self._active.info.name,
            last_error=error,
            active_sha256=self._active_key[2] if self._active_key else None,
            active_size=self._active_size,
            following=self._following(),
            motif_labels=self._active.bundle.manifest.shown_labels,
            signatures_required=self.settings.trusted_key is not None,
            stale_since=self._freshness.since,
            stale_reason=self._freshness.reason,
        )
        if publish:
            self.publish_state()
        return self._state

    def _remember(self, pipeline: ModelPipeline) -> tuple[tuple[str, str, str] | None, int | None]:
        """Identity of the model the node started with; cached so a rollback to it is local."""
        path = pipeline.bundle.path
        if path is None:
            return None, None
        data = path.read_bytes()
        try:
            add_to_cache(self.settings.cache_dir, pipeline.ref.name, pipeline.ref.version, data)
        except OSError as exc:
            logger.warning(
                "cannot cache the initial bundle in %s: %s", self.settings.cache_dir, exc
            )
        return (pipeline.ref.name, pipeline.ref.version, sha256_hex(data)), len(data)


def _parse_time(value: str) -> float:
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()
