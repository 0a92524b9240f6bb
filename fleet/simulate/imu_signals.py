"""Physically plausible 9-axis IMU signals for the fleet simulator.

Channels are ``ax, ay, az`` (specific force, m/s^2), ``gx, gy, gz`` (rad/s) and ``mx, my, mz``
(uT), all in the device frame. The wearer frame is x forward, y left, z up; the world frame is
x north, z up. The wearer's orientation is ZYX Euler (roll, pitch, heading + gait wobble); the
device sits in it with a small seeded mounting tilt, so gravity and the Earth field are projected
through the full rotation and the gyro reports the matching body rates. Each generator also owns
seeded sensor biases and a magnetometer hard-iron offset.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
from numpy.typing import NDArray

F64 = NDArray[np.float64]

GRAVITY = 9.81
EARTH_FIELD_UT: F64 = np.array([20.0, 0.0, -45.0])
_NOISE_STD: F64 = np.array([0.02] * 3 + [0.005] * 3 + [0.3] * 3)
_TWO_PI = 2.0 * math.pi
_JERK_GAIN: F64 = np.array([1.0] * 3 + [0.1] * 3 + [0.0] * 3)
_BLEND_S = 0.75  # cross-fade between activities so switches are continuous
_JITTER_TAU_S = 2.0  # correlation time of cadence / amplitude / heading wander


class Activity(StrEnum):
    """Wearer activity driving the simulated motion."""

    REST = "rest"
    WALK = "walk"
    RUN = "run"
    TURN = "turn"
    STAIRS = "stairs"
    SHAKE = "shake"


ACTIVITIES: tuple[Activity, ...] = tuple(Activity)

# Row = current activity, column = next (ACTIVITIES order); rows are normalised below.
_TRANSITIONS: F64 = np.array(
    [
        [0.0, 5.0, 1.0, 1.0, 1.0, 1.0],
        [3.0, 0.0, 2.0, 3.0, 2.0, 0.5],
        [1.0, 4.0, 0.0, 1.0, 0.5, 0.2],
        [2.0, 4.0, 1.0, 0.0, 1.0, 0.5],
        [2.0, 4.0, 0.5, 1.0, 0.0, 0.3],
        [4.0, 2.0, 0.3, 0.5, 0.3, 0.0],
    ]
)
_TRANSITIONS /= _TRANSITIONS.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class _Params:
    """Per-bout motion parameters, drawn when an activity starts."""

    freq: float  # step (or shake) frequency, Hz
    amp: float  # main linear-acceleration amplitude, m/s^2
    turn: float = 0.0  # sustained yaw rate, rad/s
    drift: float = 0.0  # heading wander scale, rad/s
    lean: float = 0.0  # constant forward pitch, rad
    jerk: float = 0.0  # extra broadband accel noise (soft tissue, impacts), m/s^2
    offs: tuple[float, float, float] = (0.0, 0.0, 0.0)  # per-axis phase offsets


def _draw_params(act: Activity, rng: np.random.Generator) -> _Params:
    u = rng.uniform
    if act is Activity.WALK:
        return _Params(u(1.6, 2.0), u(2.0, 3.0), drift=0.05, jerk=0.15)
    if act is Activity.RUN:
        return _Params(u(2.5, 3.0), u(8.0, 15.0), drift=0.08, jerk=0.5)
    if act is Activity.TURN:
        sign = 1.0 if rng.random() < 0.5 else -1.0
        return _Params(u(1.4, 1.8), u(0.8, 1.3), turn=sign * u(1.0, 2.0), drift=0.1, jerk=0.1)
    if act is Activity.STAIRS:
        return _Params(u(1.3, 1.6), u(2.5, 4.0), lean=u(0.18, 0.3), drift=0.03, jerk=0.2)
    if act is Activity.SHAKE:
        offs = rng.uniform(0.0, _TWO_PI, 3)
        return _Params(u(5.0, 8.0), u(10.0, 20.0), drift=0.3, jerk=0.5, offs=tuple(offs))
    return _Params(0.25, 0.0)


def _pulse(ph: F64, kappa: float) -> F64:
    """Zero-mean periodic von Mises pulse peaking at ph = 0 (narrower for larger kappa)."""
    return np.exp(kappa * (np.cos(ph) - 1.0)) - math.exp(-kappa) * float(np.i0(kappa))


# Each motion maps (params, step phase, amplitude modulation, yaw rate) to the wearer's linear
# acceleration in the heading frame (n, 3) and (roll, pitch, yaw wobble) angles (n, 3).
_Motion = Callable[[_Params, F64, F64, F64], tuple[F64, F64]]


def _rest(p: _Params, ph: F64, m: F64, yaw: F64) -> tuple[F64, F64]:
    return np.zeros((ph.shape[0], 3)), np.zeros((ph.shape[0], 3))


def _walk(p: _Params, ph: F64, m: F64, yaw: F64) -> tuple[F64, F64]:
    a, h = p.amp * m, ph / 2.0  # h: stride phase (left + right step)
    lin = [
        0.45 * a * (np.sin(ph + 0.3) + 0.3 * np.sin(2 * ph)),
        0.25 * a * np.sin(h),
        a * (0.8 * np.cos(ph) + 0.3 * np.cos(2 * ph + 0.6) + 0.12 * np.cos(3 * ph + 1.1)),
    ]
    ang = [0.06 * m * np.sin(h), 0.04 * m * np.sin(ph + 0.8), 0.05 * m * np.sin(h + 0.4)]
    return np.stack(lin, 1), np.stack(ang, 1)


def _run(p: _Params, ph: F64, m: F64, yaw: F64) -> tuple[F64, F64]:
    a, h = p.amp * m, ph / 2.0
    lin = [
        a * (0.25 * np.sin(ph - 0.4) - 0.15 * _pulse(ph - 0.1, 30.0)),  # braking at impact
        0.1 * a * np.sin(h),
        a * (0.4 * np.cos(ph) + 0.45 * _pulse(ph, 14.0) + 0.2 * _pulse(ph - 0.15, 40.0)),
    ]
    ang = [0.08 * m * np.sin(h), 0.06 * m * np.sin(ph + 0.5), 0.1 * m * np.sin(h + 0.3)]
    return np.stack(lin, 1), np.stack(ang, 1)


def _turn(p: _Params, ph: F64, m: F64, yaw: F64) -> tuple[F64, F64]:
    a, h = p.amp * m, ph / 2.0
    lin = [
        0.4 * a * np.sin(ph),
        0.6 * yaw + 0.2 * a * np.sin(h),  # centripetal, ~0.6 m/s walking speed
        a * (np.cos(ph) + 0.3 * np.cos(2 * ph + 0.4)),
    ]
    ang = [-0.06 * yaw + 0.03 * np.sin(h), 0.03 * np.sin(ph + 0.5), 0.03 * np.sin(h)]
    return np.stack(lin, 1), np.stack(ang, 1)


def _stairs(p: _Params, ph: F64, m: F64, yaw: F64) -> tuple[F64, F64]:
    a, h = p.amp * m, ph / 2.0
    asym = 1.0 + 0.25 * np.sin(h)  # leading vs trailing leg
    lin = [
        0.3 * a * np.sin(ph + 0.5),
        0.2 * a * np.sin(h),
        a * asym * (0.6 * np.sin(ph) + 0.3 * np.sin(2 * ph) + 0.2 * np.sin(3 * ph)),  # push-up
    ]
    ang = [0.03 * m * np.sin(h), p.lean + 0.08 * m * np.sin(ph + 0.3), 0.04 * m * np.sin(h)]
    return np.stack(lin, 1), np.stack(ang, 1)


def _shake(p: _Params, ph: F64, m: F64, yaw: F64) -> tuple[F64, F64]:
    a, (o0, o1, o2) = p.amp * m, p.offs
    lin = [
        a * (np.sin(ph + o0) + 0.2 * np.sin(2 * ph + o1)),
        a * (0.8 * np.sin(ph + o1) + 0.2 * np.sin(2 * ph + o2)),
        a * (0.6 * np.sin(ph + o2) + 0.2 * np.sin(2 * ph + o0)),
    ]
    ang = [0.12 * m * np.sin(ph + o1), 0.12 * m * np.sin(ph + o2 + 1), 0.12 * m * np.sin(ph + o0)]
    return np.stack(lin, 1), np.stack(ang, 1)


_MOTIONS: dict[Activity, _Motion] = {
    Activity.REST: _rest,
    Activity.WALK: _walk,
    Activity.RUN: _run,
    Activity.TURN: _turn,
    Activity.STAIRS: _stairs,
    Activity.SHAKE: _shake,
}


def _rot_zyx(roll: F64, pitch: F64, yaw: F64) -> F64:
    """Body-to-world rotation matrices Rz(yaw) Ry(pitch) Rx(roll), shape (..., 3, 3)."""
    cr, sr, cp, sp = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(yaw), np.sin(yaw)
    rows = [
        [cy * cp, cy * sp * sr - sy * cr, cy * sp * cr + sy * sr],
        [sy * cp, sy * sp * sr + cy * cr, sy * sp * cr - cy * sr],
        [-sp, cp * sr, cp * cr],
    ]
    return np.stack([np.stack(r, -1) for r in rows], -2)


def _ar1(x0: F64, rho: float, eps: F64) -> F64:
    """Columns of x[k] = rho * x[k-1] + eps[k] continuing from x0 (chunked for stability)."""
    out = np.empty_like(eps)
    for s in range(0, eps.shape[0], 256):
        e = eps[s : s + 256]
        k = np.arange(1, e.shape[0] + 1, dtype=np.float64)[:, None]
        out[s : s + e.shape[0]] = rho**k * (x0 + np.cumsum(e * rho**-k, axis=0))
        x0 = out[s + e.shape[0] - 1]
    return out


@dataclass(eq=False)
class ImuSignalGenerator:
    """Stateful, seeded 9-axis IMU stream; fixed ``activity`` or a Markov activity schedule."""

    rate_hz: float = 100.0
    seed: int = 0
    activity: Activity | None = None
    dwell_s: tuple[float, float] = (4.0, 12.0)

    def __post_init__(self) -> None:
        if not self.rate_hz > 0:
            raise ValueError("rate_hz must be positive")
        if not 0 < self.dwell_s[0] <= self.dwell_s[1]:
            raise ValueError("dwell_s must satisfy 0 < low <= high")
        # Independent streams so output does not depend on how samples are chunked into calls.
        sched, jitter, noise = (
            np.random.default_rng(s) for s in np.random.SeedSequence(self.seed).spawn(3)
        )
        self._sched, self._jit_rng, self._noise_rng = sched, jitter, noise
        self._rho = math.exp(-1.0 / (_JITTER_TAU_S * self.rate_hz))
        self._blend_n = max(1, round(_BLEND_S * self.rate_hz))
        tilt = sched.normal(0.0, [0.05, 0.05, 0.1]).clip(-0.2, 0.2)
        self._mount: F64 = _rot_zyx(*(np.asarray(t) for t in tilt))  # device-to-wearer
        self._bias: F64 = np.concatenate(
            [sched.normal(0, 0.03, 3), sched.normal(0, 0.002, 3), sched.uniform(-3, 3, 3)]
        )
        self._act = self.activity if self.activity is not None else ACTIVITIES[sched.integers(6)]
        self._params = _draw_params(self._act, sched)
        self._prev: tuple[Activity, _Params] = (self._act, self._params)
        self._since = self._blend_n
        self._left: int | None = None if self.activity is not None else self._dwell()
        self._phase = float(sched.uniform(0.0, 4 * math.pi))
        self._heading = float(sched.uniform(0.0, _TWO_PI))
        self._jit: F64 = jitter.standard_normal(3)
        self._last_euler: F64 | None = None
        self._render(1)  # warm-up so the first public sample already has a rate history

    @property
    def current_activity(self) -> Activity:
        """Activity being simulated at the most recently produced sample."""
        return self._act

    def next_samples(self, n: int) -> NDArray[np.float32]:
        """Return the next ``n`` samples as an (n, 9) float32 array, continuous across calls."""
        if n < 0:
            raise ValueError("n must be non-negative")
        parts: list[F64] = [np.empty((0, 9))]
        while n > 0:
            if self._left == 0:
                self._switch()
            k = n if self._left is None else min(n, self._left)
            parts.append(self._render(k))
            n -= k
            if self._left is not None:
                self._left -= k
        return np.concatenate(parts).astype(np.float32)

    def _dwell(self) -> int:
        low, high = self.dwell_s
        return max(self._blend_n, round(self._sched.uniform(low, high) * self.rate_hz))

    def _switch(self) -> None:
        nxt = ACTIVITIES[
            self._sched.choice(len(ACTIVITIES), p=_TRANSITIONS[ACTIVITIES.index(self._act)])
        ]
        self._prev = (self._act, self._params)
        self._act, self._params = nxt, _draw_params(nxt, self._sched)
        self._since, self._left = 0, self._dwell()

    def _render(self, n: int) -> F64:
        dt, rho = 1.0 / self.rate_hz, self._rho
        jit = _ar1(self._jit, rho, self._jit_rng.standard_normal((n, 3)) * math.sqrt(1 - rho**2))
        self._jit = jit[-1].copy()
        w = np.clip((self._since + 1 + np.arange(n)) / self._blend_n, 0.0, 1.0)
        self._since += n
        mod = 1.0 + 0.08 * jit[:, 1]
        bouts = [(self._act, self._params, w)]
        if w[0] < 1.0:
            bouts.append((*self._prev, 1.0 - w))
        freq = sum(wb * p.freq for _, p, wb in bouts) * (1.0 + 0.03 * jit[:, 0])
        ph = self._phase + _TWO_PI * dt * np.cumsum(freq)
        lin, ang, yaw, jerk = np.zeros((n, 3)), np.zeros((n, 3)), np.zeros(n), np.zeros(n)
        for act, p, wb in bouts:
            yaw_b = p.turn * (1.0 + 0.1 * jit[:, 2]) + p.drift * jit[:, 2]
            lin_b, ang_b = _MOTIONS[act](p, ph, mod, yaw_b)
            lin += wb[:, None] * lin_b
            ang += wb[:, None] * ang_b
            yaw += wb * yaw_b
            jerk += wb * p.jerk
        heading = self._heading + dt * np.cumsum(yaw)
        euler = ang.copy()
        euler[:, 2] += heading
        prev = euler[:1] if self._last_euler is None else self._last_euler[None]
        rates = np.diff(np.concatenate([prev, euler]), axis=0) / dt
        turns = math.floor(heading[-1] / _TWO_PI) * _TWO_PI  # keep heading bounded
        self._heading = float(heading[-1]) - turns
        self._last_euler = euler[-1].copy()
        self._last_euler[2] -= turns
        self._phase = float(ph[-1] % (4 * math.pi))  # 4 pi: stride (half-step) terms stay smooth
        roll, pitch, psi = euler.T
        r_wd = _rot_zyx(roll, pitch, psi) @ self._mount
        c, s = np.cos(psi), np.sin(psi)
        f_w = np.stack([c * lin[:, 0] - s * lin[:, 1], s * lin[:, 0] + c * lin[:, 1], lin[:, 2]], 1)
        f_w[:, 2] += GRAVITY
        acc = np.einsum("nji,nj->ni", r_wd, f_w)
        mag = np.einsum("nji,j->ni", r_wd, EARTH_FIELD_UT)
        dr, dp, dy = rates.T
        sr, cr, sp, cp = np.sin(roll), np.cos(roll), np.sin(pitch), np.cos(pitch)
        omega = np.stack([dr - dy * sp, dp * cr + dy * sr * cp, dy * cr * cp - dp * sr], 1)
        gyro = omega @ self._mount  # wearer-body rates expressed in the device frame
        std = _NOISE_STD + np.outer(jerk, _JERK_GAIN)
        noise = self._noise_rng.standard_normal((n, 9)) * std
        return np.concatenate([acc, gyro, mag], axis=1) + self._bias + noise


def _window_seeds(activity: Activity, count: int, seed: int) -> list[int]:
    ss = np.random.SeedSequence([seed, ACTIVITIES.index(activity)])
    return [int(child.generate_state(1)[0]) for child in ss.spawn(count)]


def activity_windows(
    activity: Activity, count: int, *, seed: int = 0, rate_hz: float = 100.0, length: int = 100
) -> NDArray[np.float32]:
    """``count`` windows (count, length, 9) of one activity, each from a fresh seeded device."""
    windows = [
        ImuSignalGenerator(rate_hz, s, activity).next_samples(length)
        for s in _window_seeds(activity, count, seed)
    ]
    return np.stack(windows) if windows else np.empty((0, length, 9), np.float32)


def calibration_set(
    per_activity: int = 64, *, seed: int = 0
) -> tuple[NDArray[np.float32], list[Activity]]:
    """Windows (N, 100, 9) of every activity, ``per_activity`` each, plus one label per window."""
    data = np.concatenate([activity_windows(a, per_activity, seed=seed) for a in ACTIVITIES])
    return data, [a for a in ACTIVITIES for _ in range(per_activity)]
