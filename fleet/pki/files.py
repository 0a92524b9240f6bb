"""Writing a site's files: atomically, with a given mode and, for the broker's, an owner."""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import tempfile
from pathlib import Path

from fleet.pki.errors import PkiError

Owner = tuple[int, int]
"""(uid, gid) given to a file."""


def write_atomic(path: Path, data: bytes, mode: int, owner: Owner | None = None) -> None:
    """Write `data` to `path` with `mode` (and `owner`) through a temporary file and a rename.

    The file never exists with looser permissions, and a reader (the broker on SIGHUP) sees the
    old or the new content, never half of it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def write_if_changed(path: Path, data: bytes, mode: int, owner: Owner | None = None) -> bool:
    """`write_atomic` unless `path` holds `data` with `mode` and `owner`; True when written."""
    if path.exists() and path.read_bytes() == data:
        stat = path.stat()
        if (stat.st_mode & 0o777) == mode and owner in {None, (stat.st_uid, stat.st_gid)}:
            return False
    write_atomic(path, data, mode, owner)
    return True


def parse_owner(spec: str) -> Owner:
    """`1883:1883`, `mosquitto` or `mosquitto:mosquitto` as (uid, gid)."""
    user, _, group = spec.partition(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        else:
            gid = pwd.getpwuid(uid).pw_gid
    except KeyError as exc:
        msg = f"no such user or group in {spec!r} (give numbers, e.g. 1883:1883)"
        raise PkiError(msg) from exc
    return uid, gid
