"""Fault injection for the `hailo_platform` stand-in (test-only; not part of HailoRT's API).

The stand-in consults `current()` at the points where a real Hailo device fails, so tests can
make it fail like one (hailo-notes.md sections 1, 3 and 7):

- `timeouts` (count): the next N `run_async` jobs hang like frames a stuck device never returns.
  The job stays in flight (it holds its async-queue slots), so `job.wait(t)` and `run(..., t)`
  raise `HailoRTTimeout` after the caller's timeout and `wait_for_async_ready` can time out
  behind it. `shutdown()` aborts it (its callback then gets `HailoRTStreamAborted`); otherwise,
  after HailoRT's pipeline timeout (10 s), its callback gets `completion_info.exception`
  = `HailoRTTimeout`. Jobs queued behind a hung job wait for it, as on a real device.
  One count is used per `run_async` call, when it is submitted.
- `busy`: another process holds the device; `VDevice()` raises
  `HailoRTException("libhailort failed with error: 74 (HAILO_OUT_OF_PHYSICAL_DEVICES)")`.
  A bare `Device()` (control only) still opens.
- `no_device`: no device in the system; `Device.scan()` is empty, `Device()` and `VDevice()`
  raise `HailoRTException('HailoRT device not found in the system')`.
- `arch`: "hailo8" or "hailo8l"; what `identify()` reports and what `configure()` checks the
  HEF against (a Hailo-8L refuses HEFs compiled for Hailo-8).
- `temperature_c`: what `get_chip_temperature()` reports (ts0 and ts1).
- `latency_ms`: simulated device time per `run_async` job.
- `fail_configure` (count): the next N `InferModel.configure()` calls raise
  `HailoRTDriverOperationFailedException`, like a failed driver ioctl.
- `hang_after_frames` (-1: off): the chip hangs mid-stream once it has returned this many more
  frames: every job processed after that is never returned (as `timeouts`, but for all jobs of
  every configured model on the chip) until what `hang_until` names happens:
  `reconfigure` (the next `InferModel.configure()` on the chip), `reset` (the chip is released
  by its last VDevice, which resets it; the default) or `never` (only a reboot would help).
  One hang per setting: once cleared, the chip serves on.
- `async_queue_size`: what `get_async_queue_size()` reports. 0 (the default) derives it from the
  HEF the way HailoRT's `infer_queue_size` does (the smallest stream queue; see
  `hailo_platform.pyhailort._engine.derived_queue_size`), which is not what the node's
  configuration assumes; tests sweep 1, 2, 4, 8 and 16.
- `pyhailort_version`: what the compiled `_pyhailort` reports (default: the package's own);
  another value makes `import hailo_platform` fail as a mismatched install does. Read once,
  at import: set it through the variable for a subprocess.
- `zero_cost`: a device whose compute costs the host nothing, for CPU benches (`bench.cpu
  --backend hailo`): the ONNX twin remembers the outputs of the inputs it has run (up to 4,096)
  and answers a repeated input from memory, so after a warm-up over a repeating set of windows
  the host's CPU per window is the node's own. Outputs are the twin's, as without it.
- `devices`: how many chips `Device.scan()` finds (default 1). Each VDevice without a shared
  group holds one, so tests that run several nodes in one process can give each its own chip.

Set faults from Python with `set_faults(**kw)`, `reset()` or `with injected(**kw):`, or for
nodes started as subprocesses with the environment variable `HAILO_STANDIN`, e.g.
`HAILO_STANDIN="timeouts=2,busy=1,arch=hailo8l,temperature_c=61.5,latency_ms=0.5"`
(booleans accept 1/0/true/false/yes/no/on/off). Python overrides win over the variable.
Counts are per process: each use consumes one; setting a count again (`set_faults`) or
changing its value in the variable starts a fresh budget.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

ENV_VAR = "HAILO_STANDIN"
ARCHES = ("hailo8", "hailo8l")
HANG_UNTIL = ("reconfigure", "reset", "never")
COUNTERS = ("timeouts", "fail_configure")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Faults:
    """The stand-in device's condition. Counts read by `current()` are what is left."""

    timeouts: int = 0
    busy: bool = False
    no_device: bool = False
    arch: str = "hailo8"
    temperature_c: float = 45.0
    latency_ms: float = 0.0
    fail_configure: int = 0
    hang_after_frames: int = -1
    hang_until: str = "reset"
    async_queue_size: int = 0
    devices: int = 1
    zero_cost: bool = False
    pyhailort_version: str = ""

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            msg = f"arch must be one of {ARCHES}, got {self.arch!r}"
            raise ValueError(msg)
        if self.hang_until not in HANG_UNTIL:
            msg = f"hang_until must be one of {HANG_UNTIL}, got {self.hang_until!r}"
            raise ValueError(msg)
        for name in (*COUNTERS, "async_queue_size"):
            if getattr(self, name) < 0:
                msg = f"{name} must be >= 0"
                raise ValueError(msg)
        if self.devices < 1:
            msg = "devices must be >= 1 (no_device=1 models a machine without one)"
            raise ValueError(msg)


_FIELDS = {f.name: f for f in dataclasses.fields(Faults)}
_lock = threading.RLock()
_overrides: dict[str, Any] = {}
_used: dict[str, tuple[int, int]] = {}
"""Per counter: (the configured value the budget belongs to, how many were used)."""
_hang: dict[str, Any] = {}
"""The mid-stream hang: the setting it belongs to, frames returned since, and its state."""


def _coerce(name: str, value: Any) -> Any:
    if name not in _FIELDS:
        msg = f"unknown fault {name!r}; known: {', '.join(_FIELDS)}"
        raise ValueError(msg)
    kind = type(getattr(Faults(), name))
    if kind is bool and isinstance(value, str):
        text = value.strip().lower()
        if text not in _TRUE | _FALSE:
            msg = f"fault {name}: expected a boolean, got {value!r}"
            raise ValueError(msg)
        return text in _TRUE
    if kind is str:
        return str(value).strip().lower()
    return kind(value)


def parse(text: str) -> dict[str, Any]:
    """Parse the `HAILO_STANDIN` format: comma-separated `name=value` pairs."""
    values: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep:
            msg = f"{ENV_VAR}: expected name=value, got {item!r}"
            raise ValueError(msg)
        values[name.strip()] = _coerce(name.strip(), value)
    return values


def _configured() -> Faults:
    with _lock:
        return Faults(**{**parse(os.environ.get(ENV_VAR, "")), **_overrides})


def current() -> Faults:
    """The faults in force now: `HAILO_STANDIN` merged with Python overrides, counts left."""
    with _lock:
        configured = _configured()
        left = {}
        for name in COUNTERS:
            total = getattr(configured, name)
            budget, used = _used.get(name, (total, 0))
            left[name] = max(0, total - used) if budget == total else total
        return dataclasses.replace(configured, **left)


def consume(name: str) -> bool:
    """Use one of counter `name` (e.g. "timeouts"); False when none is left."""
    if name not in COUNTERS:
        msg = f"{name!r} is not a counted fault ({COUNTERS})"
        raise ValueError(msg)
    with _lock:
        total = getattr(_configured(), name)
        budget, used = _used.get(name, (total, 0))
        if budget != total:
            used = 0
        if used >= total:
            return False
        _used[name] = (total, used + 1)
        return True


def _hang_state() -> dict[str, Any]:
    """The hang's state for the setting in force (a new setting starts afresh); under _lock."""
    configured = _configured()
    setting = (configured.hang_after_frames, configured.hang_until)
    if _hang.get("setting") != setting:
        _hang.clear()
        _hang.update(setting=setting, frames=0, state="armed" if setting[0] >= 0 else "off")
    return _hang


def frames_returned(count: int) -> None:
    """The chip returned `count` frames; arms the hang once `hang_after_frames` is reached."""
    with _lock:
        state = _hang_state()
        if state["state"] != "armed":
            return
        state["frames"] += count
        if state["frames"] >= state["setting"][0]:
            state["state"] = "hung"


def chip_hung() -> bool:
    """True while the chip is hung mid-stream (jobs are never returned)."""
    with _lock:
        state = _hang_state()
        if state["state"] == "armed" and state["setting"][0] == 0:
            state["state"] = "hung"
        return bool(state["state"] == "hung")


def chip_event(event: str) -> None:
    """`reconfigure` or `reset` happened on the chip: clears a hang waiting for it."""
    with _lock:
        state = _hang_state()
        until = state["setting"][1]
        clears = until == event or (until, event) == ("reconfigure", "reset")
        if state["state"] == "hung" and clears:
            state["state"] = "cleared"


def set_faults(**kw: Any) -> None:
    """Override faults from Python (on top of `HAILO_STANDIN`); counts start afresh."""
    with _lock:
        values = {name: _coerce(name, value) for name, value in kw.items()}
        Faults(**{**parse(os.environ.get(ENV_VAR, "")), **_overrides, **values})  # validate
        _overrides.update(values)
        for name in values:
            _used.pop(name, None)
        if {"hang_after_frames", "hang_until"} & set(values):
            _hang.clear()


def reset() -> None:
    """Drop all Python overrides and used counts (`HAILO_STANDIN` still applies)."""
    with _lock:
        _overrides.clear()
        _used.clear()
        _hang.clear()


@contextmanager
def injected(**kw: Any) -> Iterator[Faults]:
    """`set_faults(**kw)` for the duration of a `with` block, then restore what was before."""
    with _lock:
        saved_overrides, saved_used = dict(_overrides), dict(_used)
        set_faults(**kw)
    try:
        yield current()
    finally:
        with _lock:
            _overrides.clear()
            _overrides.update(saved_overrides)
            _used.clear()
            _used.update(saved_used)
            _hang.clear()
