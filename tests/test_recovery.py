"""The backend recovery's bookkeeping, on stand-in pipelines (no device, no broker needed).

The end-to-end behaviour (a hung Hailo chip, a stuck ONNX call) is in test_device_faults.py;
here: every way an outage can end clears it, back-off after a failed rebuild, the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from node.inference.recovery import BACKOFF_FIRST_S, BackendRecovery
from runtime.errors import BackendError
from schemas.messages import ErrorKind


@dataclass
class FakeInfo:
    name: str


@dataclass
class FakeBundle:
    onnx: bytes | None = b"onnx"


@dataclass
class FakePipeline:
    """What the recovery touches of a pipeline: its backend name, bundle and close()."""

    name: str
    bundle: FakeBundle = field(default_factory=FakeBundle)
    closed: bool = False

    @property
    def info(self) -> FakeInfo:
        return FakeInfo(self.name)

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    current: Any
    loads: list[str] = field(default_factory=list)
    reports: list[tuple[ErrorKind, str]] = field(default_factory=list)
    fail_loads: set[str] = field(default_factory=set)
    clock: Clock = field(default_factory=Clock)

    def __post_init__(self) -> None:
        self.recovery = BackendRecovery(
            current=lambda: self.current,
            replace=self.replace,
            load=self.load,
            fallback="onnx",
            report=lambda kind, reason: self.reports.append((kind, reason)),
            on_replaced=lambda failed, rebuilt, reason: None,
            clock=self.clock,
        )

    def replace(self, expected: Any, new: Any) -> bool:
        if self.current is not expected:
            return False
        self.current = new
        return True

    def load(self, bundle: Any, name: str) -> Any:
        self.loads.append(name)
        if name in self.fail_loads:
            msg = f"{name} will not open"
            raise BackendError(msg)
        return FakePipeline(name, bundle)


def test_a_rebuild_serves_again_and_says_how_long_serving_stopped() -> None:
    failed = FakePipeline("hailo")
    h = Harness(current=failed)
    rebuilt = h.recovery(failed, BackendError("timeout"), since=h.clock.now - 0.5)  # type: ignore[arg-type]
    assert rebuilt is h.current
    assert failed.closed
    assert h.recovery.healthy
    assert h.recovery.stats().last_downtime_s == 0.5
    assert h.reports[-1][0] is ErrorKind.BACKEND_RECOVERY


def test_an_outage_ended_by_a_hot_swap_is_cleared_by_the_next_served_batch() -> None:
    """The review's case: the manager swapped A -> B while A's batch failed."""
    a, b = FakePipeline("onnx"), FakePipeline("onnx")
    h = Harness(current=b)
    assert h.recovery(a, BackendError("boom")) is b  # type: ignore[arg-type]
    assert not a.closed  # the manager keeps it as the previous model
    assert not h.recovery.healthy
    h.clock.now += 0.2
    h.recovery.served()  # the retry on B worked
    assert h.recovery.healthy
    assert h.recovery.stats().last_downtime_s == pytest.approx(0.2)


def test_a_failed_rebuild_backs_off_then_falls_back() -> None:
    failed = FakePipeline("hailo")
    h = Harness(current=failed, fail_loads={"hailo", "onnx"})
    assert h.recovery(failed, BackendError("hung")) is None  # type: ignore[arg-type]
    assert h.loads == ["hailo", "onnx"]
    assert h.recovery.stats().failed_rebuilds == 1
    assert h.recovery(failed, BackendError("hung")) is None  # type: ignore[arg-type]
    assert h.loads == ["hailo", "onnx"]  # backing off: no new attempt yet
    h.clock.now += BACKOFF_FIRST_S + 0.01
    h.fail_loads = {"hailo"}
    fallback = h.recovery(failed, BackendError("hung"))  # type: ignore[arg-type]
    assert fallback is not None
    assert fallback.info.name == "onnx"
    assert h.recovery.healthy
    assert h.recovery.stats().fallbacks == 1
    assert any(kind is ErrorKind.BACKEND_FALLBACK for kind, _ in h.reports)
