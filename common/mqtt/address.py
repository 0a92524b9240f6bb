"""Where a broker is: a parsed `mqtt://host:port` or `mqtts://host:port` URL."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """A parsed `mqtt://host:port` or `mqtts://host:port` URL."""

    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> BrokerAddress:
        """Parse a broker URL; raises ValueError saying what a valid one looks like."""
        parts = urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in {"mqtt", "mqtts", "tcp", "ssl"} or not parts.hostname:
            msg = f"broker URL {url!r} must look like mqtt://HOST:PORT or mqtts://HOST:PORT"
            raise ValueError(msg)
        if parts.username or parts.password:
            msg = (  # without the URL: it holds a secret
                f"the broker URL for {parts.hostname} carries credentials: use username and "
                "password_file (or the *_PASSWORD environment variable) instead"
            )
            raise ValueError(msg)
        tls = parts.scheme in {"mqtts", "ssl"}
        try:
            port = parts.port
        except ValueError as exc:
            msg = f"broker URL {url!r} has an invalid port"
            raise ValueError(msg) from exc
        if port is None:
            port = 8883 if tls else 1883
        elif port == 0:
            msg = f"broker URL {url!r} has port 0; give the broker's port (1883, 8883, ...)"
            raise ValueError(msg)
        return cls(host=parts.hostname, port=port, tls=tls)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"
