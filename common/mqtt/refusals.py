"""Why a connection failed, in words that say what to fix, and whether retrying can help.

Every client of the project (node, doctor, check, the fleet tools) connects through one session
(common/mqtt/session.py), so every one reports a refusal the same way: the broker's reason code
(or the TLS alert), what it means for this login, and the setting to change. A refusal that
retrying cannot cure (a wrong password, an unknown login, a certificate the broker does not
trust, a CA that does not match the broker's certificate) is `permanent`: the session gives up
after a few of them instead of retrying forever.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from common.mqtt.client import ConnectRefusedError, SessionSettings

BAD_LOGIN = {134, 4}
"""MQTT 5 "Bad user name or password" (and 3.1.1's return code 4)."""
NOT_AUTHORIZED = {135, 5}
"""MQTT 5 "Not authorized" (and 3.1.1's return code 5)."""
PERMANENT_CODES = BAD_LOGIN | NOT_AUTHORIZED | {133, 138, 140}
"""Also: client id not valid (133), banned (138), bad authentication method (140)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """A failed connection explained."""

    reason: str
    fix: str
    permanent: bool

    def __str__(self) -> str:
        return f"{self.reason}: {self.fix}" if self.fix else self.reason


def explain(exc: BaseException, settings: SessionSettings) -> Refusal:
    """What `exc` (raised while connecting with `settings`) means, and what to change."""
    where = str(settings.address)
    login = _login(settings)
    if isinstance(exc, ConnectRefusedError) and exc.code is not None:
        return _refused(exc, where, login, settings)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return Refusal(
            f"{where}: the broker's certificate does not verify ({exc.verify_message})",
            f"ca_file {settings.ca_file or '(the system CAs)'} is not the CA that signed it, or "
            "the broker URL names another host than its certificate: use the site's ca.crt "
            "(SITE/clients/ca.crt) and a host the certificate was made for (pki init --host)",
            permanent=True,
        )
    if isinstance(exc, ssl.SSLError):
        return _tls_alert(exc, where, settings)
    if isinstance(exc, ConnectionError) and settings.address.tls:
        # the line dropped before a CONNACK over TLS: a certificate alert paho cannot show (TLS
        # 1.3 sends it after the client's handshake is done); a plain handshake tells
        probed = probe_tls(settings)
        if probed is not None:
            return explain(probed, settings)
    return _network(exc, where)


def _network(exc: BaseException, where: str) -> Refusal:
    """A failure below MQTT: no answer, nobody listening, or anything else."""
    if isinstance(exc, TimeoutError):
        return Refusal(
            f"{where}: no CONNACK",
            "wrong port, or a TLS/plain mismatch (mqtts:// for 8883 and 8884, mqtt:// for 1883)",
            permanent=False,
        )
    if isinstance(exc, ConnectionRefusedError):
        return Refusal(
            f"{where}: connection refused",
            "is the broker running, and listening on this port? (host, port, firewall)",
            permanent=False,
        )
    return Refusal(f"{where}: {exc}", "", permanent=False)


def probe_tls(settings: SessionSettings, timeout: float = 3.0) -> ssl.SSLError | None:
    """Handshake with the broker as `settings` would, and wait briefly for an alert: the TLS
    error that refuses this client (None when the TLS side is fine)."""
    address = settings.address
    try:
        context = ssl.create_default_context(cafile=settings.ca_file)
        if settings.cert_file:
            context.load_cert_chain(settings.cert_file, settings.key_file)
        with (
            socket.create_connection((address.host, address.port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=address.host) as tls,
        ):
            tls.settimeout(timeout / 3)
            try:
                tls.recv(1)  # a refused certificate answers with an alert here
            except TimeoutError:
                return None
    except ssl.SSLError as exc:
        return exc
    except OSError:
        return None
    return None


def _login(settings: SessionSettings) -> str:
    if settings.cert_file:
        return f"the certificate {settings.cert_file}"
    if settings.username:
        return f"the user {settings.username}"
    return "an anonymous client"


def _refused(
    exc: ConnectRefusedError, where: str, login: str, settings: SessionSettings
) -> Refusal:
    code = exc.code or 0
    said = f"{where} refused {login}: {exc.reason_text} (reason code {code})"
    if code in BAD_LOGIN:
        fix = (
            "check username and password_file (or IMU_*_PASSWORD); the password is the one "
            "`imu-fleet pki add` wrote to SITE/clients/NAME.password"
        )
    elif code in NOT_AUTHORIZED:
        fix = (
            "the broker does not accept this login here: is it made (`imu-fleet pki add SITE "
            "ROLE NAME`) and the broker told (SIGHUP)? certificates log in on 8883, passwords "
            "on 8884 or 127.0.0.1:1883"
        )
        if not settings.username and not settings.cert_file:
            fix = "give username and password_file, or cert_file and key_file: anonymous is off"
    else:
        fix = "see the broker's log for why"
    return Refusal(said, fix, permanent=code in PERMANENT_CODES)


def _tls_alert(exc: ssl.SSLError, where: str, settings: SessionSettings) -> Refusal:
    text = str(exc).lower()
    if "wrong version number" in text or "record layer failure" in text:
        return Refusal(
            f"{where}: the port does not speak TLS ({exc.reason})",
            "use mqtt:// for a plain port (1883) or the TLS port (8883, 8884) for mqtts://",
            permanent=True,
        )
    if "certificate required" in text or "bad certificate" in text or "unknown ca" in text:
        given = f"the certificate {settings.cert_file}" if settings.cert_file else "none"
        return Refusal(
            f"{where}: the broker refused the client certificate ({exc.reason}; given: {given})",
            "set cert_file and key_file to a certificate `imu-fleet pki add` made for this "
            "site (a password login uses port 8884 instead)",
            permanent=True,
        )
    return Refusal(f"{where}: TLS failed ({exc.reason or exc})", "", permanent=False)
