"""Waiting for a condition instead of sleeping for it, and fresh ids."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import pytest


def unique(prefix: str) -> str:
    """A fresh id for sensors and nodes, so tests on one broker never see each other."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wait_until(done: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `done` every 50 ms; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout} s for {what}")
        time.sleep(0.05)
