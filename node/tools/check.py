"""`imu-node check`: drive a running node through the broker and judge it against the targets.

The check plays a sensor: it publishes whole JSON windows on `imu/{sensor}/window` at a fixed
rate for a fixed time (QoS 1, like a real sensor), listens for their results on
`imu/{sensor}/motifs` and for the serving node's telemetry, and then compares what it measured
with the deployment targets:

- latency: p95 of publish -> result as the sensor side sees it (`--p95-ms`, 50);
- throughput: results per second sustained over the run, with none lost (`--min-rate`, 20);
- memory: the node's largest RSS in its telemetry during the run (`--max-rss-mb`, 512);
- temperature: the accelerator's (or else the board's) hottest reading (`--max-temp-c`, 85).

Only what was measured passes or fails; a figure the node did not report (a board without a
temperature sensor, no telemetry in the run) is listed as not measured, never as a pass, and
`--require-all` turns it into a failure.
"""

from __future__ import annotations

import math
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

import numpy as np
import orjson
import paho.mqtt.client as mqtt

from common.mqtt.connection import Connection
from common.mqtt.session import MqttSession
from schemas import topics

CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Targets:
    """What a node must do (the deployment guide's performance validation)."""

    p95_ms: float = 50.0
    min_rate: float = 20.0
    max_rss_mb: float = 512.0
    max_temp_c: float = 85.0


@dataclass(frozen=True, slots=True)
class CheckPlan:
    """How hard and how long to drive the node."""

    broker: str | Connection
    rate: float = 40.0
    duration_s: float = 30.0
    sensors: int = 1
    grace_s: float = 5.0
    """How long to wait for the last results after the last window."""
    node_id: str | None = None
    """Judge only results and telemetry of this node (default: whichever serves the windows)."""
    protocol: str = "5"
    sensor_id: str | None = None
    """Publish as this one sensor (a `check-NAME` login of `imu-fleet pki` publishes as
    `check-NAME` only); default: fresh `check-RUN-N` ids."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """One target: pass, fail or not measured, with the figure."""

    target: str
    outcome: str
    """`pass`, `fail` or `not measured`."""
    measured: str
    limit: str


@dataclass(slots=True)
class CheckReport:
    """Everything the check measured, and the verdicts."""

    sent: int = 0
    results: int = 0
    lost: int = 0
    duplicates: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    node_latency_ms: dict[str, float] = field(default_factory=dict)
    nodes: list[str] = field(default_factory=list)
    rss_mb: float | None = None
    temperature_c: float | None = None
    temperature_source: str | None = None
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when no measured target failed (see `unmeasured` for what was not judged)."""
        return bool(self.verdicts) and all(v.outcome != "fail" for v in self.verdicts)

    @property
    def unmeasured(self) -> list[str]:
        """Targets the node gave no figure for."""
        return [v.target for v in self.verdicts if v.outcome == "not measured"]

    def to_json(self) -> bytes:
        """The report as one JSON document."""
        body: dict[str, Any] = asdict(self)
        body["passed"] = self.passed
        body["unmeasured"] = self.unmeasured
        return orjson.dumps(body, option=orjson.OPT_INDENT_2)


class _Listener:
    """Collects results and telemetry on the session's network thread."""

    def __init__(self, sensors: set[str], node_id: str | None) -> None:
        self._sensors = sensors
        self._node_id = node_id
        self._lock = threading.Lock()
        self.sent_at: dict[tuple[str, int], float] = {}
        self.got_at: dict[tuple[str, int], float] = {}
        self.node_latency: list[float] = []
        self.duplicates = 0
        self.nodes: set[str] = set()
        self.rss: list[float] = []
        self.accelerator_temp: list[float] = []
        self.board_temp: list[float] = []

    def on_result(self, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        try:
            body = orjson.loads(message.payload)
            key = (str(body["sensor_id"]), int(body["seq"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return
        if key[0] not in self._sensors or (self._node_id and body.get("node_id") != self._node_id):
            return
        with self._lock:
            if key in self.got_at:
                self.duplicates += 1
                return
            self.got_at[key] = now
            self.nodes.add(str(body.get("node_id")))
            latency = body.get("latency_ms")
            if isinstance(latency, int | float):
                self.node_latency.append(float(latency))

    def on_telemetry(self, message: mqtt.MQTTMessage) -> None:
        try:
            body = orjson.loads(message.payload)
        except orjson.JSONDecodeError:
            return
        node = body.get("node_id")
        with self._lock:
            wanted = {self._node_id} if self._node_id else self.nodes
            if node not in wanted:
                return
            if isinstance(body.get("rss_mb"), int | float):
                self.rss.append(float(body["rss_mb"]))
            if isinstance(body.get("accelerator_temperature_c"), int | float):
                self.accelerator_temp.append(float(body["accelerator_temperature_c"]))
            if isinstance(body.get("temperature_c"), int | float):
                self.board_temp.append(float(body["temperature_c"]))

    def last_result(self) -> float | None:
        """When the last result arrived (monotonic), if any did."""
        with self._lock:
            return max(self.got_at.values(), default=None)

    def sending(self, key: tuple[str, int]) -> None:
        with self._lock:
            self.sent_at[key] = time.monotonic()

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return len(self.sent_at), len(self.got_at)

    def latencies_ms(self) -> list[float]:
        """Publish -> result of every window answered so far."""
        with self._lock:
            return [
                (self.got_at[k] - self.sent_at[k]) * 1000 for k in self.got_at if k in self.sent_at
            ]

    def recent_latencies(self) -> list[float]:
        return self.latencies_ms()[-500:]


Progress = Callable[[float, int, int, list[float]], None]
"""(fraction done, windows sent, results received, recent latencies ms)."""


def run_check(plan: CheckPlan, targets: Targets, progress: Progress | None = None) -> CheckReport:
    """Drive the node as `plan` says and judge it; ConnectionError when the broker is away."""
    run = uuid.uuid4().hex[:6]
    if plan.sensor_id is not None and plan.sensors != 1:
        msg = f"--sensor-id {plan.sensor_id} is one sensor: leave --sensors at 1"
        raise ValueError(msg)
    sensors = (
        [plan.sensor_id] if plan.sensor_id else [f"check-{run}-{i}" for i in range(plan.sensors)]
    )
    listener = _Listener(set(sensors), plan.node_id)
    session = MqttSession(
        Connection.of(plan.broker, plan.protocol).session_settings(
            plan.sensor_id or f"imu-check-{run}",
            max_pending_publishes=max(1000, int(plan.rate * plan.duration_s) + 100),
        )
    )
    for sensor in sensors:
        session.route(topics.motifs(sensor), listener.on_result)
    session.route(topics.node_telemetry("+"), listener.on_telemetry, qos=0)
    session.connect(CONNECT_TIMEOUT_S)
    try:
        started = _drive(session, plan, sensors, listener, progress)
        _wait_for_results(plan, listener, progress)
    finally:
        session.stop()
    finished = listener.last_result() or time.monotonic()
    # over at least the planned time: a short run's burst is not a sustained rate
    return _judge(listener, targets, seconds=max(finished - started, plan.duration_s))


def _window_rows(variant: int) -> bytes:
    """The JSON rows of a plausible raw window (gravity on z, magnetometer field)."""
    rng = np.random.default_rng(variant)
    base = np.array([0.0, 0.0, 9.81, 0.0, 0.0, 0.0, 20.0, 0.0, -45.0])
    x = base + rng.normal(0, [2, 2, 2, 0.5, 0.5, 0.5, 3, 3, 3], (100, 9))
    return orjson.dumps(x.round(4).tolist())


def _drive(
    session: MqttSession,
    plan: CheckPlan,
    sensors: list[str],
    listener: _Listener,
    progress: Progress | None,
) -> float:
    total = max(1, math.ceil(plan.rate * plan.duration_s))
    rows = [_window_rows(variant) for variant in range(min(total, 64))]  # cheap to send
    period = 1.0 / plan.rate
    started = time.monotonic()
    next_report = started
    for i in range(total):
        due = started + i * period
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sensor = sensors[i % len(sensors)]
        seq = i // len(sensors)
        payload = b'{"x":' + rows[i % len(rows)] + b',"seq":' + str(seq).encode() + b"}"
        listener.sending((sensor, seq))
        session.publish(topics.window(sensor), payload, qos=1)
        if progress is not None and time.monotonic() >= next_report:
            next_report += 0.25
            sent, got = listener.counts()
            progress((i + 1) / total, sent, got, listener.recent_latencies())
    return started


def _wait_for_results(plan: CheckPlan, listener: _Listener, progress: Progress | None) -> None:
    deadline = time.monotonic() + plan.grace_s
    while time.monotonic() < deadline:
        sent, got = listener.counts()
        if progress is not None:
            progress(1.0, sent, got, listener.recent_latencies())
        if got >= sent:
            return
        time.sleep(0.05)


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {
        "p50": round(float(p50), 2),
        "p95": round(float(p95), 2),
        "p99": round(float(p99), 2),
        "max": round(max(values), 2),
    }


def _judge(listener: _Listener, targets: Targets, *, seconds: float) -> CheckReport:
    sent, got = listener.counts()
    latencies = listener.latencies_ms()
    report = CheckReport(
        sent=sent,
        results=got,
        lost=sent - got,
        duplicates=listener.duplicates,
        seconds=round(seconds, 2),
        rate=round(got / seconds, 2) if seconds > 0 else 0.0,
        latency_ms=_percentiles(latencies),
        node_latency_ms=_percentiles(listener.node_latency),
        nodes=sorted(listener.nodes),
        rss_mb=max(listener.rss, default=None),
    )
    if listener.accelerator_temp:
        report.temperature_c, report.temperature_source = max(listener.accelerator_temp), "chip"
    elif listener.board_temp:
        report.temperature_c, report.temperature_source = max(listener.board_temp), "board"
    report.verdicts = _verdicts(report, targets)
    return report


def _verdicts(report: CheckReport, targets: Targets) -> list[Verdict]:
    verdicts = []
    p95 = report.latency_ms.get("p95")
    if p95 is None:
        verdicts.append(
            Verdict("latency p95", "fail", "no result arrived", f"< {targets.p95_ms:g} ms")
        )
    else:
        outcome = "pass" if p95 < targets.p95_ms else "fail"
        verdicts.append(
            Verdict("latency p95", outcome, f"{p95:.2f} ms", f"< {targets.p95_ms:g} ms")
        )
    sustained = report.rate >= targets.min_rate and report.lost == 0
    detail = f"{report.rate:.1f} windows/s, {report.lost} of {report.sent} without a result"
    verdicts.append(
        Verdict(
            "throughput",
            "pass" if sustained else "fail",
            detail,
            f">= {targets.min_rate:g} windows/s, none lost",
        )
    )
    if report.rss_mb is None:
        verdicts.append(
            Verdict(
                "memory (RSS)",
                "not measured",
                "no telemetry from the node",
                f"< {targets.max_rss_mb:g} MB",
            )
        )
    else:
        outcome = "pass" if report.rss_mb < targets.max_rss_mb else "fail"
        verdicts.append(
            Verdict(
                "memory (RSS)", outcome, f"{report.rss_mb:.1f} MB", f"< {targets.max_rss_mb:g} MB"
            )
        )
    if report.temperature_c is None:
        verdicts.append(
            Verdict(
                "temperature", "not measured", "no sensor reported", f"< {targets.max_temp_c:g} C"
            )
        )
    else:
        outcome = "pass" if report.temperature_c < targets.max_temp_c else "fail"
        verdicts.append(
            Verdict(
                "temperature",
                outcome,
                f"{report.temperature_c:.1f} C ({report.temperature_source})",
                f"< {targets.max_temp_c:g} C",
            )
        )
    return verdicts


def format_report(report: CheckReport) -> str:
    """The verdict table and the figures behind it."""
    nodes = ", ".join(report.nodes) or "none answered"
    lines = [
        f"node(s): {nodes}",
        f"sent {report.sent} windows, {report.results} results, {report.lost} lost, "
        f"{report.duplicates} duplicates in {report.seconds:.1f} s",
    ]
    if report.latency_ms:
        e2e = report.latency_ms
        lines.append(
            f"latency publish -> result: p50 {e2e['p50']:.2f}  p95 {e2e['p95']:.2f}  "
            f"p99 {e2e['p99']:.2f}  max {e2e['max']:.2f} ms"
        )
    if report.node_latency_ms:
        inside = report.node_latency_ms
        lines.append(
            f"latency inside the node:   p50 {inside['p50']:.2f}  p95 {inside['p95']:.2f}  "
            f"p99 {inside['p99']:.2f}  max {inside['max']:.2f} ms"
        )
    lines.append("")
    for v in report.verdicts:
        lines.append(f"[{v.outcome.upper():^12}] {v.target:<14} {v.measured:<44} target {v.limit}")
    failed = [v.target for v in report.verdicts if v.outcome == "fail"]
    met = [v.target for v in report.verdicts if v.outcome == "pass"]
    summary = f"FAIL: missed {', '.join(failed)}" if failed else f"PASS: met {', '.join(met)}"
    if report.unmeasured:
        summary += f"; NOT MEASURED (not judged): {', '.join(report.unmeasured)}"
    lines.append("")
    lines.append(summary)
    return "\n".join(lines)


def progress_bar(stream: TextIO = sys.stderr) -> Progress:
    """A one-line progress bar on a terminal; a line per quarter elsewhere (logs, CI)."""
    interactive = stream.isatty()
    shown = {"quarter": -1}

    def show(fraction: float, sent: int, got: int, latencies: list[float]) -> None:
        p95 = f"{np.percentile(latencies, 95):.1f} ms" if latencies else "-"
        bar = "#" * int(fraction * 30)
        line = f"[{bar:<30}] {fraction:4.0%}  sent {sent}  results {got}  p95 {p95}"
        if interactive:
            stream.write("\r" + line)
            if fraction >= 1.0 and got >= sent:
                stream.write("\n")
        elif int(fraction * 4) > shown["quarter"]:
            shown["quarter"] = int(fraction * 4)
            stream.write(line + "\n")
        stream.flush()

    return show
