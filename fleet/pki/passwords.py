"""Broker passwords in mosquitto's PBKDF2-SHA512 format, and the broker's password file.

Hashes are `$7$iterations$salt_b64$hash_b64`, made by `mosquitto_passwd` when it is installed (the
password goes through its stdin, never its command line), else by `hash_password`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Final

from fleet.pki.errors import PkiError

PBKDF2_ITERATIONS: Final = 101
"""mosquitto_passwd 2.0's default. Passwords here are 192 random bits, so stretching adds nothing,
and the broker runs PBKDF2 on every password login."""
PBKDF2_SALT_BYTES: Final = 12  # mosquitto rejects any other salt length
PBKDF2_HASH_BYTES: Final = 64  # SHA-512 output length, the only length mosquitto accepts


def hash_password(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """`$7$ITERATIONS$SALT$HASH`: PBKDF2-HMAC-SHA512 as mosquitto 2.0 reads it.

    mosquitto (src/security_default.c, unpwd__decode_passwords) wants type 7, the iteration
    count, a 12-byte salt and a 64-byte hash, both in standard base64 with padding.
    """
    salt = secrets.token_bytes(PBKDF2_SALT_BYTES) if salt is None else salt
    if len(salt) != PBKDF2_SALT_BYTES:
        msg = f"mosquitto needs a {PBKDF2_SALT_BYTES}-byte salt, got {len(salt)}"
        raise PkiError(msg)
    digest = hashlib.pbkdf2_hmac(
        "sha512", password.encode(), salt, iterations, dklen=PBKDF2_HASH_BYTES
    )
    salt64 = base64.b64encode(salt).decode()
    hash64 = base64.b64encode(digest).decode()
    return f"$7${iterations}${salt64}${hash64}"


def verify_password(password: str, hashed: str) -> bool:
    """True when `hashed` (a `$7$...` entry of a password file) is the hash of `password`."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[:2] != ["", "7"]:
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, len(expected))
    return hmac.compare_digest(digest, expected)


def hash_with_mosquitto_passwd(username: str, password: str) -> str | None:
    """The `$7$...` hash `mosquitto_passwd` makes for `password`; None when it is not installed.

    The password goes through stdin (typed twice, as at a terminal), so that it never shows in
    the process list as it would with `mosquitto_passwd -b`.
    """
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory(prefix="imu-pki-") as scratch:
        path = Path(scratch) / "passwd"
        result = subprocess.run(
            [tool, "-c", str(path), username],
            input=f"{password}\n{password}\n",
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        entries = read_password_file(path) if path.exists() else {}
    hashed = entries.get(username)
    if result.returncode != 0 or hashed is None or not verify_password(password, hashed):
        msg = f"mosquitto_passwd failed ({result.returncode}): {result.stderr.strip()}"
        raise PkiError(msg)
    return hashed


def make_password_hash(username: str, password: str, *, use_tool: bool | None = None) -> str:
    """Hash with mosquitto_passwd when installed (or when `use_tool`), else in Python."""
    if use_tool is False:
        return hash_password(password)
    hashed = hash_with_mosquitto_passwd(username, password)
    if hashed is None:
        if use_tool:
            msg = "mosquitto_passwd is not installed"
            raise PkiError(msg)
        return hash_password(password)
    return hashed


def read_password_file(path: Path) -> dict[str, str]:
    """`{username: hash}` from a mosquitto password file (empty when there is none)."""
    if not path.exists():
        return {}
    entries: dict[str, str] = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#") and ":" in line:
            user, hashed = line.split(":", 1)
            entries[user] = hashed
    return entries


def render_password_file(entries: dict[str, str]) -> str:
    """`{username: hash}` in mosquitto's format (`user:$7$...`, one a line), sorted."""
    return "".join(f"{user}:{hashed}\n" for user, hashed in sorted(entries.items()))
