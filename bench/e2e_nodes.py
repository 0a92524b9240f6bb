"""Node processes for `bench.e2e`: one, or several in one group sharing the sensor topics.

Each node is `python -m node.cli run` in its own process (so its RSS is its own), with its own
node_id, its logs in a file (shown when it dies), ready once its retained status says `online`.

Share modes say how a group of nodes divides the load and what the load generator publishes
(both start the nodes with `--share-group`):
- `window`: MQTT 5 shared subscriptions: the broker hands each `window` message to one node of
  the group; any node serves any window.
- `samples`: every node follows every sensor's sample runs and serves the windows it owns
  (docs/scaling.md, sensor-affine groups).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt

from bench.e2e_load import Topic, client
from schemas import topics


@dataclass(frozen=True)
class ShareMode:
    """How nodes of one group split the sensors' traffic."""

    topic: Topic  # what the load generator publishes
    help: str

    def node_args(self, group: str) -> list[str]:
        """The `imu-node run` options that put a node in `group`."""
        return ["--share-group", group]


STANDIN = Path(__file__).resolve().parents[1] / "tests" / "hailo_standin"
"""The `hailo_platform` stand-in (tests/hailo_standin): on PYTHONPATH, nodes run "on Hailo"."""

SHARE_MODES = {
    "window": ShareMode("window", "MQTT 5 shared subscription on window topics (--share-group)"),
    "samples": ShareMode(
        "samples",
        "sample runs (JSON) that each member follows, every window served by one member "
        "(--share-group; docs/scaling.md)",
    ),
}


def peak_rss_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of a process, in MiB."""
    values = {"rss": float("nan"), "peak": float("nan")}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return values
    for line in lines:
        if line.startswith("VmHWM:"):
            values["peak"] = int(line.split()[1]) / 1024
        elif line.startswith("VmRSS:"):
            values["rss"] = int(line.split()[1]) / 1024
    return values


@dataclass
class NodeSettings:
    """What every node of a run gets."""

    broker: str
    bundle: Path
    workers: str
    protocol: str
    state_dir: Path
    extra: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    """Variables set (or replaced) for the node processes only."""


class NodeGroup:
    """`count` node processes; with `share` they form one group of `mode`."""

    def __init__(
        self,
        settings: NodeSettings,
        ids: list[str],
        *,
        share: str | None = None,
        mode: str = "window",
    ) -> None:
        """Start the nodes (see `wait_ready`)."""
        self.ids = ids
        self.settings = settings
        self._logs = [settings.state_dir / f"{node_id}.log" for node_id in ids]
        group_args = SHARE_MODES[mode].node_args(share) if share else []
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "XDG_STATE_HOME": str(settings.state_dir),
            **dict(settings.env),
        }
        self.processes: list[subprocess.Popen[bytes]] = []
        for node_id, log in zip(ids, self._logs, strict=True):
            with log.open("wb") as out:
                self.processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "node.cli",
                            "run",
                            "--broker",
                            settings.broker,
                            "--node-id",
                            node_id,
                            "--model",
                            str(settings.bundle),
                            "--log-level",
                            "WARNING",
                            "--log-format",
                            "text",
                            "--mqtt-protocol",
                            settings.protocol,
                            "--workers",
                            settings.workers,
                            *group_args,
                            *settings.extra,
                        ],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every node's retained status says `online` (model loaded, golden check
        passed, subscribed); raises with the node's log if one exits first."""
        online: set[str] = set()
        cv = threading.Condition()

        def on_message(c: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
            if not message.payload:
                return
            if orjson.loads(message.payload).get("state") == "online":
                with cv:
                    online.add(message.topic)
                    cv.notify_all()

        watcher = client(self.settings.broker, f"{self.ids[0]}-watch", self.settings.protocol)
        watcher.on_message = on_message
        for node_id in self.ids:
            watcher.subscribe(topics.node_status(node_id), qos=1)
        deadline = time.monotonic() + timeout
        try:
            with cv:
                while len(online) < len(self.ids):
                    self._check_alive()
                    if time.monotonic() > deadline:
                        msg = f"nodes not online after {timeout:g} s: {self._log_tails()}"
                        raise RuntimeError(msg)
                    cv.wait(0.2)
        finally:
            watcher.disconnect()
            watcher.loop_stop()
        time.sleep(0.5)  # the status is announced as the subscriptions go out: let them land

    def _check_alive(self) -> None:
        for node_id, process in zip(self.ids, self.processes, strict=True):
            if process.poll() is not None:
                msg = f"node {node_id} exited ({process.returncode}): {self._log_tails()}"
                raise RuntimeError(msg)

    def _log_tails(self) -> str:
        tails = []
        for log in self._logs:
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            tails.append(f"\n--- {log.name} ---\n" + "\n".join(lines[-15:]))
        return "".join(tails)

    def rss_mb(self) -> dict[str, dict[str, float]]:
        """Each node's RSS now and its peak, in MiB."""
        return {
            node_id: peak_rss_mb(process.pid)
            for node_id, process in zip(self.ids, self.processes, strict=True)
        }

    def stop(self) -> None:
        """SIGTERM every node (they drain), wait, then clear their retained state topics."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        cleaner = client(self.settings.broker, f"{self.ids[0]}-clean", self.settings.protocol)
        try:
            for node_id in self.ids:
                for topic in (topics.node_status(node_id), topics.node_model(node_id)):
                    cleaner.publish(topic, b"", qos=1, retain=True).wait_for_publish(5)
        finally:
            cleaner.disconnect()
            cleaner.loop_stop()

    def __enter__(self) -> NodeGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
