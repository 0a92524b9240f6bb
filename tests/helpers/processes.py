"""Processes a test starts end with the test, whichever way it ends."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

KILL_WAIT_S = 10.0


def stop_process(
    process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 20.0
) -> int:
    """Send `sig` and wait up to `timeout` s; then SIGKILL it (and wait). Its exit status (a
    negative signal number when it had to be killed)."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(KILL_WAIT_S)
