"""A broker on loopback for the demo, tests and benchmarks.

Prefers a real mosquitto (`set_tcp_nodelay true`, persistence only when given a state folder) on
a free port. Where mosquitto is not installed, it runs amqtt (pure Python, MQTT 3.1.1 only) in a
background thread; clients must then speak MQTT 3.1.1, which `LocalBroker.protocol` tells them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

logger = logging.getLogger(__name__)

BrokerKind = Literal["auto", "mosquitto", "amqtt"]

MOSQUITTO_CONF = """\
listener {port} 127.0.0.1
allow_anonymous true
user {user}
{persistence}
set_tcp_nodelay true
max_inflight_messages 1000
max_queued_messages 100000
sys_interval 1
log_dest stderr
log_type error
log_type warning
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.02)
    msg = f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s"
    raise TimeoutError(msg)


class LocalBroker:
    """Start with `start()` (or `with LocalBroker() as broker:`), connect to `broker.url`."""

    def __init__(
        self,
        kind: BrokerKind = "auto",
        port: int | None = None,
        state_dir: Path | None = None,
        *,
        detached: bool = False,
    ) -> None:
        """A broker of `kind` on `port` (a free one by default).

        `state_dir` (mosquitto only) keeps sessions, queued and retained messages across a stop
        and a start, as a production broker with persistence does. `detached`: mosquitto runs
        in a session of its own, so a Ctrl-C in the terminal reaches only its owner, which
        stops it last (the demo), instead of killing it under the clients.
        """
        self.detached = detached
        if kind == "auto":
            kind = "mosquitto" if shutil.which("mosquitto") else "amqtt"
        if kind == "mosquitto" and not shutil.which("mosquitto"):
            msg = "mosquitto is not installed (apt-get install mosquitto), use kind='amqtt'"
            raise RuntimeError(msg)
        if state_dir is not None and kind != "mosquitto":
            msg = "a persistent LocalBroker needs mosquitto"
            raise RuntimeError(msg)
        self.kind: Literal["mosquitto", "amqtt"] = kind
        self.state_dir = state_dir
        self.port = port or free_port()
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._amqtt: Any = None

    @property
    def url(self) -> str:
        """`mqtt://127.0.0.1:PORT`."""
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The mosquitto process's id (None for the embedded broker, or when stopped)."""
        return self._process.pid if self._process is not None else None

    @property
    def protocol(self) -> Literal["5", "3.1.1"]:
        """The newest MQTT version this broker speaks."""
        return "5" if self.kind == "mosquitto" else "3.1.1"

    def start(self) -> LocalBroker:
        """Start the broker and wait until it accepts connections."""
        if self.kind == "mosquitto":
            self._start_mosquitto()
        else:
            self._start_amqtt()
        wait_for_port(self.port)
        logger.info("%s broker on %s", self.kind, self.url)
        return self

    def kill(self) -> None:
        """Kill a mosquitto the hard way (SIGKILL: a crash, the OOM killer): it keeps only what
        its persistence had saved. Start a new `LocalBroker` on the same port to restart it."""
        if self._process is None:
            msg = "kill() needs a running mosquitto"
            raise RuntimeError(msg)
        self._process.kill()
        self._process.wait()
        self._process = None
        self.stop()

    def stop(self) -> None:
        """Stop the broker (idempotent)."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._loop is not None and self._amqtt is not None:
            future = asyncio.run_coroutine_threadsafe(self._amqtt.shutdown(), self._loop)
            with contextlib.suppress(Exception):
                future.result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            self._loop = self._amqtt = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _start_mosquitto(self) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="imu-broker-")
        conf = Path(self._workdir.name) / "mosquitto.conf"
        persistence = "persistence false"
        if self.state_dir is not None:
            persistence = f"persistence true\npersistence_location {self.state_dir.resolve()}/"
        # run as whoever started it (as root, mosquitto would switch to a `mosquitto` user that
        # cannot write a state folder under a private temporary directory)
        user = pwd.getpwuid(os.geteuid()).pw_name
        conf.write_text(MOSQUITTO_CONF.format(port=self.port, user=user, persistence=persistence))
        log = (Path(self._workdir.name) / "mosquitto.log").open("wb")
        self._process = subprocess.Popen(
            ["mosquitto", "-c", str(conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=self.detached,
        )

    def _start_amqtt(self) -> None:
        try:
            from amqtt.broker import Broker  # noqa: PLC0415 (optional dependency)
        except ImportError as exc:
            msg = (
                "no broker available: install mosquitto (apt-get install mosquitto) or the "
                "embedded one (pip install 'imu-edge[demo]'), or pass --broker URL"
            )
            raise RuntimeError(msg) from exc
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            asyncio.set_event_loop(loop)
            try:
                self._amqtt = Broker(config, loop=loop)
                loop.run_until_complete(self._amqtt.start())
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        self._loop = loop
        self._thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            msg = f"embedded broker failed to start: {failure[0]}"
            raise RuntimeError(msg) from failure[0]
