"""Which desired-state messages a node may act on: signature, scope, expiry and freshness.

The retained desired-state topics are the fleet's control plane, and anyone who can publish on
them, or replay what they once held, could steer the node. The guard answers the attacks TUF
names for update systems:

- **unsigned or foreign** (with a trust key): only messages signed by a trusted key count;
- **moved** (mix-and-match): a signed message names the scope and target it was issued for
  (`fleet`, `group` + name, `node` + id) and is refused on any other topic;
- **rollback / replay**: per scope, the node remembers the newest `issued_at` it accepted and
  when it last saw that scope cleared (an empty retained message), on disk so that a restart
  does not forget; an older message there is a replay and is refused. The same message again
  (a retained redelivery on reconnect) is not a replay;
- **freeze**: signed messages carry `expires_at` (the controller service renews current ones);
  an expired one is refused, and one followed that expires makes the node report a stale
  control plane (`StaleDesiredError`, errors kind `control_plane_stale`, status, metric);
- **a node without memory** (new, re-imaged) takes a signed message only when it was issued
  within `FRESH_S`: a captured order older than that is refused;
- **clears** are orders too: with a trust key only a signed clear (`cleared: true`, dated by the
  fleet) counts, never an empty retained message; without one, an empty message clears and is
  dated as the newest order it clears (an order issued after that one is taken);
- a message dated more than an hour ahead of the node's clock is refused (a controller with a
  wrong clock would otherwise block that scope for everything issued before that date).

A refused message changes nothing: the node keeps following what it followed before. The
reason goes to the errors topic (kind `desired_refused`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import orjson
from pydantic import ValidationError

from common.errors import EdgeError
from common.signing import SignatureError, TrustStore, verify_desired
from schemas import topics
from schemas.control import DesiredModel

logger = logging.getLogger(__name__)

MAX_AHEAD_S = 3600.0
"""A message issued further in the future than this (by the node's clock) is refused."""
FRESH_S = 900.0
"""A node with no memory of a scope (new, or re-imaged) takes a signed message there only when
it was issued within this many seconds: the controller service renews current ones every few
minutes, so an older one is a captured order replayed."""


class DesiredRefusedError(EdgeError):
    """A desired-state message the node will not act on; the reason says why."""

    stale: bool = False
    """True when the refusal is about age (expired, or too old to take): the control plane is
    stale, whoever published the message."""


class StaleDesiredError(DesiredRefusedError):
    """A desired state refused for its age: expired, or older than the freshness window."""

    stale = True


@dataclass(frozen=True, slots=True)
class Scope:
    """One desired-state topic: its level and target (group name, node id, or none)."""

    level: str
    target: str | None

    @property
    def key(self) -> str:
        """How the scope is stored on disk."""
        return f"{self.level}:{self.target or ''}"

    def __str__(self) -> str:
        return f"{self.level} {self.target}" if self.target else self.level

    @classmethod
    def of(cls, level: str, group: str, node_id: str) -> Scope:
        """Level `level` as node `node_id` of group `group` follows it."""
        return cls(level, {"fleet": None, "group": group, "node": node_id}[level])

    @property
    def topic(self) -> str:
        """The retained topic this scope's desired state is published on."""
        if self.level == "fleet":
            return topics.FLEET_DESIRED
        target = self.target or ""
        return (
            topics.group_desired(target) if self.level == "group" else topics.node_desired(target)
        )


LEVELS: Final = ("node", "group", "fleet")
"""Desired-state levels, most specific first: a node follows the first one that is set."""


def parse_desired(payload: bytes | bytearray) -> DesiredModel | None:
    """A desired-state message: None for an empty one (it clears its level); ValueError saying
    what is wrong with a malformed one."""
    if not payload:
        return None
    try:
        return DesiredModel.model_validate_json(payload)
    except ValidationError as exc:
        msg = f"invalid desired state: {exc.errors()[0]['msg']}"
        raise ValueError(msg) from None


def digest(desired: DesiredModel, raw: bytes | None = None) -> str:
    """A message's identity: its bytes as received (what a retained redelivery repeats exactly,
    whatever this node's version of the schema makes of them), else its serialisation."""
    body = raw if raw is not None else desired.model_dump_json().encode()
    return hashlib.sha256(body).hexdigest()[:16]


class DesiredGuard:
    """Admits or refuses desired-state messages, remembering per scope what it has seen."""

    def __init__(
        self,
        trust: TrustStore | None,
        state_file: Path | None,
        clock: Callable[[], float] = time.time,
        fresh_s: float = FRESH_S,
    ) -> None:
        self._trust = trust
        self._fresh_s = fresh_s
        self._file = state_file
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, float | str | bool | None]] = self._load()

    def admit(
        self, scope: Scope, desired: DesiredModel | None, raw: bytes | None = None
    ) -> DesiredModel | None:
        """The message to follow on `scope` (None: the scope was cleared), or raise why not.

        `raw` is the message as received (its identity for a retained redelivery)."""
        with self._lock:
            if desired is None:  # an empty retained message
                if self._trust is not None:
                    msg = (
                        f"an unsigned clear (empty message) of the {scope} desired state: this "
                        "node acts only on signed desired states; clear it with a signed clear "
                        "(imu-fleet does when given --sign-key)"
                    )
                    raise DesiredRefusedError(msg)
                # dated as the newest order it clears, not by this node's clock: an order the
                # fleet issued just before the clear reached the node stays newer than it
                seen = self._seen.get(scope.key)
                self._remember(scope, float(seen["issued_at"] or 0.0) if seen else 0.0, None)
                return None
            self._check_signature(desired)
            self._check_scope(scope, desired)
            self._check_expiry(desired)
            self._check_fresh(scope, desired, raw)
            self._remember(scope, desired.issued_at, digest(desired, raw), desired.cleared)
            return None if desired.cleared else desired

    def _check_signature(self, desired: DesiredModel) -> None:
        if self._trust is None:
            return
        if desired.signature is None:
            msg = (
                f"unsigned desired state for {desired.name} {desired.version}: this node acts "
                "only on desired states signed by the fleet key"
            )
            raise DesiredRefusedError(msg)
        try:
            verify_desired(desired, self._trust)
        except SignatureError as exc:
            raise DesiredRefusedError(str(exc)) from exc

    def _check_scope(self, scope: Scope, desired: DesiredModel) -> None:
        if desired.scope is None:
            if self._trust is not None:
                msg = (
                    f"signed desired state for {desired.name} {desired.version} names no scope; "
                    "sign it for the topic it is published on (imu-fleet does)"
                )
                raise DesiredRefusedError(msg)
            return
        issued_for = Scope(desired.scope, desired.target if desired.scope != "fleet" else None)
        if issued_for != scope:
            msg = (
                f"desired state for {desired.name} {desired.version} was issued for "
                f"{issued_for}, not for {scope}: moved to another topic"
            )
            raise DesiredRefusedError(msg)

    def _check_expiry(self, desired: DesiredModel) -> None:
        if desired.expires_at is not None and desired.expires_at <= self._clock():
            msg = (
                f"desired state for {desired.name} {desired.version} expired at "
                f"{_iso(desired.expires_at)}: the fleet's controller service renews current "
                "desired states; check that it runs (`imu-fleet controller`)"
            )
            raise StaleDesiredError(msg)

    def _check_fresh(self, scope: Scope, desired: DesiredModel, raw: bytes | None) -> None:
        if desired.issued_at > self._clock() + MAX_AHEAD_S:
            msg = (
                f"desired state for {desired.name} {desired.version} was issued at "
                f"{_iso(desired.issued_at)}, more than an hour ahead of this node's clock: "
                "check the clocks of the fleet controller and the node (NTP)"
            )
            raise DesiredRefusedError(msg)
        seen = self._seen.get(scope.key)
        if seen is None:
            if self._trust is not None and desired.issued_at < self._clock() - self._fresh_s:
                msg = (
                    f"desired state for {desired.name} {desired.version} on {scope} was issued "
                    f"at {_iso(desired.issued_at)}, more than {self._fresh_s:g} s ago, and this "
                    "node has no record of that topic (new or re-imaged): too old to take, as a "
                    "captured order would be. The controller service renews current ones; check "
                    "that it runs (`imu-fleet controller`)"
                )
                raise StaleDesiredError(msg)
            return
        newest = float(seen["issued_at"] or 0.0)
        if desired.issued_at > newest:
            return
        if desired.issued_at == newest and seen.get("digest") == digest(desired, raw):
            return  # the same message again: a retained redelivery
        what = "saw it cleared" if seen.get("cleared", True) else "followed one issued"
        msg = (
            f"desired state for {desired.name} {desired.version} on {scope} was issued at "
            f"{_iso(desired.issued_at)}, but this node already {what} at {_iso(newest)} there: "
            "a replayed or stale message"
        )
        raise DesiredRefusedError(msg)

    def _remember(
        self, scope: Scope, issued_at: float, message_digest: str | None, cleared: bool = True
    ) -> None:
        seen = self._seen.get(scope.key)
        if seen is not None and float(seen["issued_at"] or 0.0) > issued_at:
            return
        self._seen[scope.key] = {
            "issued_at": issued_at,
            "digest": message_digest,
            "cleared": cleared,
        }
        self._save()

    def _load(self) -> dict[str, dict[str, float | str | bool | None]]:
        if self._file is None or not self._file.exists():
            return {}
        try:
            data = orjson.loads(self._file.read_bytes())
        except (OSError, orjson.JSONDecodeError) as exc:
            logger.error("cannot read %s (%s); no desired-state history", self._file, exc)
            return {}
        return {str(k): dict(v) for k, v in data.items() if isinstance(v, dict)}

    def _save(self) -> None:
        if self._file is None:
            return
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            partial = self._file.with_suffix(".partial")
            partial.write_bytes(orjson.dumps(self._seen))
            with contextlib.suppress(OSError):
                os.chmod(partial, 0o600)
            partial.replace(self._file)
        except OSError as exc:
            logger.error("cannot save the desired-state history to %s: %s", self._file, exc)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
