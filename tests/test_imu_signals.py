"""Tests for the synthetic 9-axis IMU signal generator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from fleet.simulate.imu_signals import (
    ACTIVITIES,
    Activity,
    ImuSignalGenerator,
    activity_windows,
    calibration_set,
)

F64 = NDArray[np.float64]
G = 9.81
MOVING = [a for a in ACTIVITIES if a is not Activity.REST]


def stream(activity: Activity | None, n: int, seed: int = 0, **kw: object) -> F64:
    gen = ImuSignalGenerator(seed=seed, activity=activity, **kw)  # type: ignore[arg-type]
    return gen.next_samples(n).astype(np.float64)


def yaw_rates(x: F64) -> F64:
    """Per-window mean rotation rate about the (mean-accel) gravity axis, rad/s."""
    up = x[..., :3].mean(axis=-2)
    up /= np.linalg.norm(up, axis=-1, keepdims=True)
    rates: F64 = np.einsum("...nc,...c->...n", x[..., 3:6], up).mean(axis=-1)
    return rates


def test_activity_enum() -> None:
    assert tuple(Activity) == ACTIVITIES
    assert [str(a) for a in ACTIVITIES] == ["rest", "walk", "run", "turn", "stairs", "shake"]
    assert Activity("turn") is Activity.TURN


@settings(max_examples=30, deadline=None)
@given(
    activity=st.sampled_from([None, *ACTIVITIES]),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 400),
)
def test_shape_dtype_finite(activity: Activity | None, seed: int, n: int) -> None:
    out = ImuSignalGenerator(seed=seed, activity=activity).next_samples(n)
    assert out.shape == (n, 9)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()


@pytest.mark.parametrize("activity", [None, *ACTIVITIES])
def test_deterministic_per_seed(activity: Activity | None) -> None:
    a, b = stream(activity, 500, seed=7), stream(activity, 500, seed=7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, stream(activity, 500, seed=8))


@settings(max_examples=25, deadline=None)
@given(
    activity=st.sampled_from([None, *ACTIVITIES]),
    seed=st.integers(0, 1000),
    cuts=st.lists(st.integers(0, 1200), max_size=8),
)
def test_chunking_does_not_change_the_stream(
    activity: Activity | None, seed: int, cuts: list[int]
) -> None:
    whole = stream(activity, 1200, seed=seed, dwell_s=(1.0, 3.0))
    gen = ImuSignalGenerator(seed=seed, activity=activity, dwell_s=(1.0, 3.0))
    bounds = [0, *sorted(cuts), 1200]
    parts = [gen.next_samples(hi - lo) for lo, hi in itertools.pairwise(bounds)]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("activity", ACTIVITIES)
def test_no_jump_at_call_boundaries(activity: Activity) -> None:
    gen = ImuSignalGenerator(seed=3, activity=activity)
    calls = [gen.next_samples(50).astype(np.float64) for _ in range(40)]
    within = np.concatenate([np.abs(np.diff(c, axis=0)) for c in calls])
    boundary = np.stack([np.abs(b[0] - a[-1]) for a, b in itertools.pairwise(calls)])
    assert (boundary.max(axis=0) <= within.max(axis=0)).all()
    assert (boundary.mean(axis=0) <= 2.0 * within.mean(axis=0)).all()


def test_activity_switches_are_smooth() -> None:
    x = stream(None, 60_000, seed=1, dwell_s=(1.0, 2.0))
    per_activity = [np.abs(np.diff(stream(a, 6000), axis=0)).max(axis=0) for a in ACTIVITIES]
    worst = np.max(per_activity, axis=0)
    assert (np.abs(np.diff(x, axis=0)).max(axis=0) <= 1.5 * worst).all()


def test_rest_is_gravity_plus_noise() -> None:
    x = stream(Activity.REST, 3000, seed=5)
    assert np.abs(np.linalg.norm(x[:, :3], axis=1) - G).max() < 0.2
    assert np.abs(x[:, 3:6]).max() < 0.05
    assert x[:, :3].std(axis=0).max() < 0.05
    mean = x[:, :3].mean(axis=0)
    tilt = np.arccos(mean[2] / np.linalg.norm(mean))
    assert tilt < 0.3  # small per-device mounting tilt


def test_accel_energy_ordering() -> None:
    def accel_std(a: Activity) -> float:
        return float(activity_windows(a, 32, seed=2)[..., :3].std(axis=1).mean())

    rest, walk, run = (accel_std(a) for a in (Activity.REST, Activity.WALK, Activity.RUN))
    assert run > 2.0 * walk
    assert walk > 10.0 * rest
    assert accel_std(Activity.SHAKE) > run


@pytest.mark.parametrize(
    ("activity", "lo", "hi"),
    [
        (Activity.WALK, 1.5, 2.1),
        (Activity.RUN, 2.4, 3.1),
        (Activity.STAIRS, 1.2, 1.7),
        (Activity.SHAKE, 4.8, 8.2),
    ],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dominant_frequency(activity: Activity, lo: float, hi: float, seed: int) -> None:
    x = stream(activity, 2048, seed=seed)[:, :3]
    x -= x.mean(axis=0)
    spectrum = np.abs(np.fft.rfft(x, axis=0)) ** 2
    freqs = np.fft.rfftfreq(x.shape[0], d=1 / 100.0)
    peak = freqs[spectrum.sum(axis=1).argmax()]
    assert lo <= peak <= hi


def test_turn_rotates_about_gravity() -> None:
    rates = yaw_rates(activity_windows(Activity.TURN, 64, seed=4).astype(np.float64))
    assert np.abs(rates).mean() > 0.8
    assert (np.abs(rates) > 0.5).all()
    others = yaw_rates(activity_windows(Activity.WALK, 64, seed=4).astype(np.float64))
    assert np.abs(others).mean() < 0.2


def test_turn_rotates_horizontal_magnetic_field() -> None:
    x = stream(Activity.TURN, 1000, seed=6)
    up = x[:, :3].mean(axis=0)
    up /= np.linalg.norm(up)
    east = np.cross(up, [1.0, 0.0, 0.0])
    east /= np.linalg.norm(east)
    north = np.cross(east, up)
    horiz = np.unwrap(np.arctan2(x[:, 6:] @ east, x[:, 6:] @ north))
    mag_rate = (horiz[-1] - horiz[0]) / 10.0  # field turns opposite to the body in body frame
    gyro_rate = float(x[:, 3:6].mean(axis=0) @ up)
    assert abs(gyro_rate) > 0.8
    assert mag_rate == pytest.approx(-gyro_rate, rel=0.15)


@pytest.mark.parametrize("activity", [Activity.WALK, Activity.TURN, Activity.SHAKE])
def test_gyro_matches_magnetometer_kinematics(activity: Activity) -> None:
    # A fixed world vector seen from a rotating body obeys dm/dt = -omega x m.
    x = stream(activity, 20_000, seed=9)
    dm = np.diff(x[:, 6:], axis=0) * 100.0
    pred = -np.cross(x[1:, 3:6], x[:-1, 6:])
    slope = float((dm * pred).sum() / (pred * pred).sum())
    assert slope == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("activity", [None, *ACTIVITIES])
def test_magnetometer_norm(activity: Activity | None) -> None:
    norm = np.linalg.norm(stream(activity, 3000, seed=11)[:, 6:], axis=1)
    assert norm.min() > 40.0
    assert norm.max() < 60.0


def test_scheduler_visits_several_activities() -> None:
    gen = ImuSignalGenerator(seed=0)
    seen = set()
    for _ in range(120):
        gen.next_samples(100)
        seen.add(gen.current_activity)
    assert len(seen) > 1


@pytest.mark.parametrize("activity", ACTIVITIES)
def test_fixed_activity_never_switches(activity: Activity) -> None:
    gen = ImuSignalGenerator(seed=0, activity=activity, dwell_s=(0.5, 0.5))
    for _ in range(20):
        gen.next_samples(100)
        assert gen.current_activity is activity


def test_activity_windows_shape_and_determinism() -> None:
    w = activity_windows(Activity.WALK, 5, seed=3, length=80)
    assert w.shape == (5, 80, 9)
    assert w.dtype == np.float32
    assert np.array_equal(w, activity_windows(Activity.WALK, 5, seed=3, length=80))
    assert not np.array_equal(w, activity_windows(Activity.WALK, 5, seed=4, length=80))
    assert not np.array_equal(w[0], w[1])  # fresh phase/heading/device per window
    assert activity_windows(Activity.RUN, 0).shape == (0, 100, 9)


def test_calibration_set_layout() -> None:
    data, labels = calibration_set(4, seed=1)
    assert data.shape == (24, 100, 9)
    assert data.dtype == np.float32
    assert labels == [a for a in ACTIVITIES for _ in range(4)]
    assert np.array_equal(data, calibration_set(4, seed=1)[0])


def test_nearest_centroid_separates_activities() -> None:
    def features(x: NDArray[np.float32]) -> F64:
        x64 = x.astype(np.float64)
        return np.concatenate([x64.mean(axis=1), np.log(x64.std(axis=1))], axis=1)

    train, train_labels = calibration_set(64, seed=0)
    test, test_labels = calibration_set(64, seed=1)
    y_train = np.array([ACTIVITIES.index(a) for a in train_labels])
    y_test = np.array([ACTIVITIES.index(a) for a in test_labels])
    f_train, f_test = features(train), features(test)
    mu, sd = f_train.mean(axis=0), f_train.std(axis=0)
    f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
    centroids = np.stack([f_train[y_train == k].mean(axis=0) for k in range(len(ACTIVITIES))])
    dist = ((f_test[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
    accuracy = float((dist.argmin(axis=1) == y_test).mean())
    assert accuracy > 0.9


@pytest.mark.parametrize(
    "kwargs",
    [{"rate_hz": 0.0}, {"rate_hz": -5.0}, {"dwell_s": (0.0, 1.0)}, {"dwell_s": (3.0, 2.0)}],
)
def test_invalid_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="must"):
        ImuSignalGenerator(**kwargs)  # type: ignore[arg-type]


def test_negative_n_rejected() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        ImuSignalGenerator().next_samples(-1)
