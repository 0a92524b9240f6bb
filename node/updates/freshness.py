"""Whether a node's control plane is fresh: what it follows is signed recently enough.

Signed desired states expire, and the fleet's controller service renews the current ones every
few minutes. When the one a node follows expires without a renewal, or the one on a topic was
too old to take, nobody is steering the node any more: a controller down, or someone holding the
retained topics still (a freeze). The node keeps serving what it has, and says so: errors kind
`control_plane_stale`, `stale_since`/`stale_reason` in its retained model state, the
`imu_node_control_plane_stale` metric, and `imu-fleet nodes`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from schemas.control import DesiredModel

CHECK_S = 5.0
"""How often a node looks whether what it follows has expired."""


class Freshness:
    """Tracks why the control plane is stale, if it is (not thread-safe: the manager's)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._refused: dict[str, str] = {}
        """Topic level -> why its message was too old to take."""
        self.since: float | None = None
        """Since when it is stale (None: fresh)."""
        self.reason: str | None = None

    def refused(self, level: str, reason: str) -> None:
        """The message on `level` was refused for its age."""
        self._refused[level] = reason

    def admitted(self, level: str) -> None:
        """A message on `level` was taken (or the level cleared)."""
        self._refused.pop(level, None)

    def update(self, followed: tuple[str, DesiredModel] | None) -> bool:
        """Recompute from what the node follows; True when it turned stale (a report is due)."""
        reason = None
        if followed is not None:
            level, desired = followed
            if desired.expires_at is not None and desired.expires_at <= self._clock():
                expired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(desired.expires_at))
                reason = (
                    f"the {level} desired state it follows ({desired.name} {desired.version}) "
                    f"expired at {expired} without a renewal: is the fleet's controller service "
                    "(`imu-fleet controller`) running? The node keeps serving what it has"
                )
        if reason is None and self._refused:
            reason = next(iter(self._refused.values()))
        turned = reason is not None and self.since is None
        if reason is None:
            self.since = None
        elif self.since is None:
            self.since = self._clock()
        self.reason = reason
        return turned
