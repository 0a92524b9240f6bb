"""Who may see the dashboard: a bearer token, or a session a one-time link opened.

A browser's `EventSource` cannot send an `Authorization` header, so a person opens a one-time
link: `https://host:8090/?code=CODE`. The dashboard prints one when it starts, and whoever holds
the token makes more (`imu-fleet dashboard-link`, or `POST /login` with the bearer token). A
code works once, within five minutes; it opens a session of its own, a random id in an
HttpOnly, SameSite=Strict cookie (Secure under TLS) that expires on the server after twelve
hours, whatever the browser keeps. The token itself never travels in a URL. Every comparison
is constant-time.

The listen rule is the node's (`http_listen`): a token is required unless the dashboard listens
on loopback only, or `--open` says, on purpose, that anyone who reaches the port may look.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from typing import Final

from common.http import bearer_matches, is_loopback

COOKIE_NAME: Final = "imu_fleet_session"
SESSION_S: Final = 12 * 3600
"""A session ends this long after its link was used, on the server."""
LINK_S: Final = 300
"""A one-time link works once, within this many seconds."""
MAX_SESSIONS: Final = 256
MAX_LINKS: Final = 64


def check_listen(host: str, *, token: bool, open_: bool) -> None:
    """Refuse a listen address beyond this machine without a token, unless `open_`."""
    if not is_loopback(host) and not token and not open_:
        msg = (
            f"--listen {host} reaches beyond this machine: give --token-file (a bearer token for "
            "the page, its events and /metrics), or --open to show the fleet to anyone who can "
            "reach the port, on purpose"
        )
        raise ValueError(msg)


class Gate:
    """The token check, one-time links and the sessions they open (thread-safe); `token` None
    means the dashboard is open."""

    def __init__(
        self,
        token: bytes | None,
        *,
        secure_cookie: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.token = token
        self.secure_cookie = secure_cookie
        self._clock = clock
        self._links: OrderedDict[str, float] = OrderedDict()
        """One-time code -> when it stops working."""
        self._sessions: OrderedDict[str, float] = OrderedDict()
        """Session id -> when it ends."""
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        """True when no token is required."""
        return self.token is None

    def login(self, authorization: str | None, cookie_header: str | None) -> str | None:
        """Who is asking: `bearer`, `session:ID8` (a session a link opened), or `open`; None
        when nobody may (no valid token or session)."""
        if self.token is None:
            return "open"
        if authorization and bearer_matches(authorization, self.token):
            return "bearer"
        value = _cookie(cookie_header, COOKIE_NAME)
        if value is None:
            return None
        now = self._clock()
        with self._lock:
            self._expire(now)
            for session, _ends in self._sessions.items():
                if hmac.compare_digest(session.encode(), value.encode()):
                    return f"session:{session[:8]}"
        return None

    def allows(self, authorization: str | None, cookie_header: str | None) -> bool:
        """True for a valid bearer header or session cookie (or when open)."""
        return self.login(authorization, cookie_header) is not None

    def new_link(self) -> str:
        """A one-time code (`/?code=CODE`), valid `LINK_S` seconds."""
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._expire(self._clock())
            self._links[code] = self._clock() + LINK_S
            while len(self._links) > MAX_LINKS:
                self._links.popitem(last=False)
        return code

    def redeem(self, code: str) -> str | None:
        """Use a one-time code: the `Set-Cookie` value of the new session, or None when the
        code is unknown, used or expired."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            match = next((known for known in self._links if hmac.compare_digest(known, code)), None)
            if match is None:
                return None
            del self._links[match]
            session = secrets.token_urlsafe(32)
            self._sessions[session] = now + SESSION_S
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        secure = "; Secure" if self.secure_cookie else ""
        return (
            f"{COOKIE_NAME}={session}; Path=/; Max-Age={SESSION_S}; HttpOnly; "
            f"SameSite=Strict{secure}"
        )

    def sessions(self) -> int:
        """Sessions open now."""
        with self._lock:
            self._expire(self._clock())
            return len(self._sessions)

    def _expire(self, now: float) -> None:
        for table in (self._links, self._sessions):
            for key in [key for key, ends in table.items() if ends <= now]:
                del table[key]


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
