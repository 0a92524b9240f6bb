"""The node's supervisor: every long-lived thread alive, work making progress, systemd told.

A named thread looks, once a second, at what must hold while the node serves:

- every long-lived thread is alive: the MQTT network thread, the inference worker, the
  inference watchdog, the model manager, the result outbox, telemetry and HTTP;
- work makes progress: windows waiting in the queue while none is finished for `stall_s` (and no
  backend call running: the inference watchdog owns those) is a stall. With several inference
  workers each is also judged on its own (`watch_progress`): one stuck worker is a stall even
  while the others keep serving.

A death or a stall is logged, reported on the errors topic (kind `watchdog`), shown in `/readyz`
(`supervised`) and telemetry, and ends the process with status 70 (EX_SOFTWARE) for systemd to
restart it: threads are not restarted in place, a clean process is.

systemd (`Type=notify`, `WatchdogSec=`): when `NOTIFY_SOCKET` is set, the supervisor sends
`READY=1` once the node serves, `WATCHDOG=1` every half `WATCHDOG_USEC` while every check holds,
and `STOPPING=1` on a clean stop. A supervisor that itself hangs stops the pings, and systemd
restarts the node.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0


def thread_running(thread: threading.Thread) -> bool:
    """True while `thread` runs, and before it was started (a component not started yet is not
    dead)."""
    return not thread.ident or thread.is_alive()


def sd_notify(message: str) -> bool:
    """Send `message` to systemd's notify socket; False when there is none (not under systemd)."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as exc:
        logger.warning("cannot notify systemd (%s): %s", message, exc)
        return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of systemd's `WatchdogSec` (from `WATCHDOG_USEC`), None when it is off."""
    value = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not value.isdigit() or int(value) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(value) / 2e6


@dataclass(frozen=True, slots=True)
class Watched:
    """One long-lived thread to keep alive."""

    name: str
    alive: Callable[[], bool]


Progress = Callable[[], tuple[int, int, bool]]
"""(windows waiting, windows finished so far, a backend call running)."""


@dataclass(slots=True)
class _ProgressWatch:
    """One progress source and when it last moved."""

    name: str | None
    progress: Progress
    last_done: int = -1
    last_progress: float = field(default=0.0)


class Supervisor:
    """Checks the node's threads and progress; tells systemd; calls `on_failure` once."""

    def __init__(
        self,
        watched: list[Watched],
        progress: Progress,
        *,
        stall_s: float,
        on_failure: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._watched = watched
        self._stall_s = stall_s
        self._on_failure = on_failure
        self._clock = clock
        self.failure: str | None = None
        """What failed first (None while everything holds)."""
        self._progress_watches = [_ProgressWatch(None, progress, last_progress=clock())]
        self._ping_every = watchdog_interval_s()
        self._last_ping = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)

    @property
    def healthy(self) -> bool:
        """True while no thread died and no stall was seen."""
        return self.failure is None

    def watch(self, watched: Watched) -> None:
        """Also keep this thread alive (one started after the supervisor was made)."""
        self._watched.append(watched)

    def watch_progress(self, name: str, progress: Progress) -> None:
        """Also judge this part's own progress (one of several inference workers)."""
        self._progress_watches.append(_ProgressWatch(name, progress, last_progress=self._clock()))

    def start(self) -> None:
        """Start supervising; tells systemd the node is ready."""
        sd_notify("READY=1")
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising (a clean stop: systemd is told)."""
        sd_notify("STOPPING=1")
        self._stop.set()
        if self._thread.ident:
            self._thread.join(2.0)

    def check(self) -> str | None:
        """One round of checks; what failed, or None (the thread calls this; tests may too)."""
        if self.failure is not None:
            return self.failure
        for watched in self._watched:
            if not watched.alive():
                return self._fail(f"the {watched.name} thread died")
        now = self._clock()
        for watch in self._progress_watches:
            waiting, done, busy = watch.progress()
            if done != watch.last_done or waiting == 0 or busy:
                watch.last_done, watch.last_progress = done, now
            elif now - watch.last_progress > self._stall_s:
                where = "" if watch.name is None else f" in the {watch.name}"
                return self._fail(
                    f"no progress{where}: {waiting} windows waiting and none finished for "
                    f"{now - watch.last_progress:.0f} s, with no backend call running"
                )
        if self._ping_every is not None and now - self._last_ping >= self._ping_every:
            sd_notify("WATCHDOG=1")
            self._last_ping = now
        return None

    def _fail(self, reason: str) -> str:
        self.failure = reason
        logger.critical("supervisor: %s", reason)
        self._on_failure(reason)
        return reason

    def _run(self) -> None:
        while not self._stop.wait(min(CHECK_INTERVAL_S, self._ping_every or CHECK_INTERVAL_S)):
            try:
                self.check()
            except Exception:  # the supervisor must outlive a bug in what it reads
                logger.exception("supervisor check failed")
