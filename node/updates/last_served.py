"""The bundle a node served last: recorded at each swap, read at the next start.

`active-bundle.json` in the node's state folder names the cached file; node/updates/startup.py
falls back on it when the configured model cannot be used (or none is configured).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import orjson

logger = logging.getLogger(__name__)

ACTIVE_FILE = "active-bundle.json"


def remember_active(state_dir: Path, bundle_path: Path) -> None:
    """Record the bundle now serving (its cached file) for the next start."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        partial = state_dir / f"{ACTIVE_FILE}.partial"
        partial.write_bytes(orjson.dumps({"path": str(bundle_path)}))
        with contextlib.suppress(OSError):
            os.chmod(partial, 0o600)
        partial.replace(state_dir / ACTIVE_FILE)
    except OSError as exc:
        logger.error("cannot record the active bundle in %s: %s", state_dir, exc)


def remembered(state_dir: Path) -> Path | None:
    """The bundle the node served last, when it recorded one that still exists."""
    try:
        path = Path(orjson.loads((state_dir / ACTIVE_FILE).read_bytes())["path"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return None
    return path if path.is_file() else None
