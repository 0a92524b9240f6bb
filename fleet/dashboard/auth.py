"""Who may see the dashboard: a bearer token, or the cookie a one-time `?token=` link sets.

A browser's `EventSource` cannot send an `Authorization` header, so a person opens
`https://host:8090/?token=TOKEN` once: the server checks it, answers with a cookie (HttpOnly,
SameSite=Strict, Secure under TLS) and redirects to `/`, so the token leaves the address bar and
the history. The cookie holds an HMAC of the token, not the token: a stolen cookie opens this
dashboard only, and rotating the token (restart with a new file) ends every session.
Every comparison is constant-time.

The listen rule is the node's (`http_listen`): a token is required unless the dashboard listens
on loopback only, or `--open` says, on purpose, that anyone who reaches the port may look.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from typing import Final

from common.http import bearer_matches, is_loopback

COOKIE_NAME: Final = "imu_fleet_dashboard"
_COOKIE_CONTEXT: Final = b"imu-fleet dashboard session v1"
COOKIE_MAX_AGE_S: Final = 12 * 3600


def check_listen(host: str, *, token: bool, open_: bool) -> None:
    """Refuse a listen address beyond this machine without a token, unless `open_`."""
    if not is_loopback(host) and not token and not open_:
        msg = (
            f"--listen {host} reaches beyond this machine: give --token-file (a bearer token for "
            "the page, its events and /metrics), or --open to show the fleet to anyone who can "
            "reach the port, on purpose"
        )
        raise ValueError(msg)


@dataclass(frozen=True, slots=True)
class Gate:
    """The token check; `token` None means the dashboard is open."""

    token: bytes | None
    secure_cookie: bool = False

    @property
    def open(self) -> bool:
        """True when no token is required."""
        return self.token is None

    def _session_value(self) -> str:
        assert self.token is not None
        return hmac.new(self.token, _COOKIE_CONTEXT, hashlib.sha256).hexdigest()

    def allows(self, authorization: str | None, cookie_header: str | None) -> bool:
        """True for a valid bearer header or session cookie (or when open)."""
        if self.token is None:
            return True
        if authorization and bearer_matches(authorization, self.token):
            return True
        value = _cookie(cookie_header, COOKIE_NAME)
        return value is not None and hmac.compare_digest(
            value.encode(), self._session_value().encode()
        )

    def token_matches(self, candidate: str) -> bool:
        """True when a `?token=` value is the token (constant time)."""
        return self.token is not None and hmac.compare_digest(candidate.encode(), self.token)

    def set_cookie(self) -> str:
        """The `Set-Cookie` value that opens this dashboard in a browser."""
        secure = "; Secure" if self.secure_cookie else ""
        return (
            f"{COOKIE_NAME}={self._session_value()}; Path=/; Max-Age={COOKIE_MAX_AGE_S}; "
            f"HttpOnly; SameSite=Strict{secure}"
        )


def _cookie(header: str | None, name: str) -> str | None:
    if not header or len(header) > 8192:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None
