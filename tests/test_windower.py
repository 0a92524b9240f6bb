"""SampleWindower: hop semantics, run splitting, per-sensor streams, gaps, resets, timestamps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from node.ingest.windower import CutWindow, Discontinuity, SampleWindower, SequenceEvent
from schemas.limits import CHANNELS, WINDOW_LENGTH

FloatArray = NDArray[np.float32]


def stream(n: int, *, offset: float = 0.0) -> FloatArray:
    """n samples whose every value identifies its index (row i holds i*9 + channel + offset)."""
    return (np.arange(n * CHANNELS, dtype=np.float32).reshape(n, CHANNELS) + offset).astype(
        np.float32
    )


def expected_windows(data: FloatArray, seq0: int, hop: int) -> list[tuple[int, FloatArray]]:
    """The windows one uninterrupted stream must yield: starts seq0, seq0+hop, ..."""
    return [
        (seq0 + start, data[start : start + WINDOW_LENGTH])
        for start in range(0, len(data) - WINDOW_LENGTH + 1, hop)
    ]


def feed(
    windower: SampleWindower, sensor: str, data: FloatArray, seq0: int, lengths: list[int]
) -> list[CutWindow]:
    """Feed `data` as consecutive runs of the given lengths; asserts no event is reported."""
    out: list[CutWindow] = []
    position = 0
    for length in lengths:
        windows, event = windower.add(sensor, data[position : position + length], seq0 + position)
        assert event is None
        out.extend(windows)
        position += length
    return out


def assert_same(got: list[CutWindow], want: list[tuple[int, FloatArray]]) -> None:
    assert [w.seq for w in got] == [seq for seq, _ in want]
    for window, (_, x) in zip(got, want, strict=True):
        assert window.x.shape == (WINDOW_LENGTH, CHANNELS)
        assert window.x.dtype == np.float32
        np.testing.assert_array_equal(window.x, x)


# --- hop semantics -------------------------------------------------------------------------------


@pytest.mark.parametrize("hop", [1, 7, 25, 50, 99, 100])
@pytest.mark.parametrize("n", [0, 1, 99, 100, 101, 150, 199, 200, 333])
def test_one_run_yields_windows_every_hop(hop: int, n: int) -> None:
    data = stream(n)
    windows, event = SampleWindower(hop).add("s1", data, 1000)
    assert event is None
    want = expected_windows(data, 1000, hop)
    assert_same(windows, want)
    if n < WINDOW_LENGTH:
        assert windows == []
    else:
        assert len(windows) == (n - WINDOW_LENGTH) // hop + 1


def test_window_is_cut_as_soon_as_its_100th_sample_arrives() -> None:
    windower = SampleWindower(50)
    data = stream(200)
    assert windower.add("s", data[:99], 0)[0] == []
    (first,) = windower.add("s", data[99:100], 99)[0]
    assert first.seq == 0
    assert windower.add("s", data[100:149], 100)[0] == []
    (second,) = windower.add("s", data[149:150], 149)[0]
    assert second.seq == 50
    np.testing.assert_array_equal(second.x, data[50:150])


@pytest.mark.parametrize("hop", [0, -1, 101, 1000])
def test_hop_outside_1_to_100_is_rejected(hop: int) -> None:
    with pytest.raises(ValueError, match=r"hop must be 1\.\.100"):
        SampleWindower(hop)


# --- run splitting and sensors (property) ---------------------------------------------------------

run_lengths = st.lists(st.integers(1, 300), min_size=1, max_size=12)


@settings(deadline=None, max_examples=60)
@given(hop=st.integers(1, WINDOW_LENGTH), lengths=run_lengths, seq0=st.integers(0, 10**12))
def test_splitting_a_stream_into_runs_changes_nothing(
    hop: int, lengths: list[int], seq0: int
) -> None:
    data = stream(sum(lengths))
    whole, event = SampleWindower(hop).add("s", data, seq0)
    assert event is None
    split = feed(SampleWindower(hop), "s", data, seq0, lengths)
    assert_same(whole, expected_windows(data, seq0, hop))
    assert_same(split, expected_windows(data, seq0, hop))


@settings(deadline=None, max_examples=50)
@given(
    hop=st.integers(1, WINDOW_LENGTH),
    lengths_a=run_lengths,
    lengths_b=run_lengths,
    order=st.lists(st.booleans(), max_size=24),
)
def test_sensors_are_windowed_independently(
    hop: int, lengths_a: list[int], lengths_b: list[int], order: list[bool]
) -> None:
    data = {"a": stream(sum(lengths_a)), "b": stream(sum(lengths_b), offset=0.5)}
    seq0 = {"a": 0, "b": 5_000}
    pending = {"a": list(lengths_a), "b": list(lengths_b)}
    position = {"a": 0, "b": 0}
    got: dict[str, list[CutWindow]] = {"a": [], "b": []}
    windower = SampleWindower(hop)
    picks = iter(order)
    while pending["a"] or pending["b"]:
        if pending["a"] and pending["b"]:
            sensor = "a" if next(picks, True) else "b"
        else:
            sensor = "a" if pending["a"] else "b"
        length = pending[sensor].pop(0)
        start = position[sensor]
        windows, event = windower.add(
            sensor, data[sensor][start : start + length], seq0[sensor] + start
        )
        assert event is None
        got[sensor].extend(windows)
        position[sensor] += length
    for sensor in ("a", "b"):
        assert_same(got[sensor], expected_windows(data[sensor], seq0[sensor], hop))
        assert windower.buffered(sensor) == position[sensor] - len(got[sensor]) * hop


def test_windows_do_not_alias_the_callers_array_or_each_other() -> None:
    windower = SampleWindower(5)
    data = stream(105)
    first, _ = windower.add("s", data, 0)
    assert [w.seq for w in first] == [0, 5]
    data[:] = -1.0  # the caller reuses its buffer
    first[0].x[:] = -2.0  # a consumer scribbles on a window
    later, _ = windower.add("s", stream(10, offset=105 * CHANNELS), 105)
    whole = stream(115)
    np.testing.assert_array_equal(first[1].x, whole[5:105])
    assert [w.seq for w in later] == [10, 15]
    np.testing.assert_array_equal(later[0].x, whole[10:110])
    np.testing.assert_array_equal(later[1].x, whole[15:115])


# --- gaps and resets ------------------------------------------------------------------------------


def test_first_run_never_reports_an_event() -> None:
    for seq in (0, 17, 10**9):
        windows, event = SampleWindower(50).add(f"s{seq}", stream(10), seq)
        assert event is None
        assert windows == []


def test_gap_reports_and_restarts_at_the_new_sequence() -> None:
    windower = SampleWindower(50)
    before = stream(150)
    windows, _ = windower.add("s", before, 0)
    assert [w.seq for w in windows] == [0, 50]
    assert windower.buffered("s") == 50

    after = stream(120, offset=10_000.0)
    windows, event = windower.add("s", after, 170)
    assert event == SequenceEvent(Discontinuity.GAP, expected=150, got=170)
    assert [w.seq for w in windows] == [170]
    np.testing.assert_array_equal(windows[0].x, after[:100])  # nothing from before the gap
    assert windower.buffered("s") == 70


def test_backwards_sequence_reports_reset() -> None:
    windower = SampleWindower(100)
    windower.add("s", stream(60), 500)
    windows, event = windower.add("s", stream(100, offset=1.0), 0)
    assert event == SequenceEvent(Discontinuity.RESET, expected=560, got=0)
    assert [w.seq for w in windows] == [0]
    np.testing.assert_array_equal(windows[0].x, stream(100, offset=1.0))


def test_repeated_run_is_a_reset() -> None:
    windower = SampleWindower(50)
    windower.add("s", stream(30), 40)
    _, event = windower.add("s", stream(30), 40)
    assert event == SequenceEvent(Discontinuity.RESET, expected=70, got=40)
    assert windower.buffered("s") == 30


def test_gap_on_one_sensor_leaves_the_other_alone() -> None:
    windower = SampleWindower(100)
    windower.add("a", stream(60), 0)
    windower.add("b", stream(60), 0)
    _, event = windower.add("a", stream(10), 500)
    assert event is not None
    windows, event = windower.add("b", stream(100)[60:], 60)
    assert event is None
    assert [w.seq for w in windows] == [0]


def segments_of(runs: list[tuple[int, int]]) -> list[tuple[int, int, list[int]]]:
    """Split runs (seq, length) into contiguous segments: (seq, total length, run indices)."""
    segments: list[tuple[int, int, list[int]]] = []
    end = None
    for index, (seq, length) in enumerate(runs):
        if end is None or seq != end:
            segments.append((seq, 0, []))
        seq0, total, members = segments[-1]
        segments[-1] = (seq0, total + length, [*members, index])
        end = seq + length
    return segments


@settings(deadline=None, max_examples=60)
@given(
    hop=st.integers(1, WINDOW_LENGTH),
    steps=st.lists(st.tuples(st.integers(-400, 400), st.integers(1, 300)), min_size=1, max_size=10),
)
def test_windows_never_span_a_discontinuity(hop: int, steps: list[tuple[int, int]]) -> None:
    """Each run continues, jumps ahead or goes back; every segment is windowed on its own."""
    runs: list[tuple[int, int]] = []
    end = 1_000
    for jump, length in steps:
        seq = end + jump if runs else 1_000
        runs.append((seq, length))
        end = seq + length
    payloads = [stream(length, offset=1e6 * i) for i, (_, length) in enumerate(runs)]

    windower = SampleWindower(hop)
    got: list[CutWindow] = []
    events: list[SequenceEvent | None] = []
    for (seq, _), payload in zip(runs, payloads, strict=True):
        windows, event = windower.add("s", payload, seq)
        got.extend(windows)
        events.append(event)

    want: list[tuple[int, FloatArray]] = []
    for seq0, _, members in segments_of(runs):
        data = np.concatenate([payloads[i] for i in members])
        want.extend(expected_windows(data, seq0, hop))
    assert_same(got, want)

    assert events[0] is None
    for index in range(1, len(runs)):
        previous_end = runs[index - 1][0] + runs[index - 1][1]
        seq = runs[index][0]
        if seq == previous_end:
            assert events[index] is None
        else:
            kind = Discontinuity.GAP if seq > previous_end else Discontinuity.RESET
            assert events[index] == SequenceEvent(kind, expected=previous_end, got=seq)


# --- timestamps -----------------------------------------------------------------------------------


def test_window_times_follow_the_runs_clock() -> None:
    windower = SampleWindower(25)
    windows, _ = windower.add("s", stream(160), 40, t0=1_700_000_000.0, rate_hz=100.0)
    assert [w.seq for w in windows] == [40, 65, 90]
    for window in windows:
        assert window.t0 == pytest.approx(1_700_000_000.0 + (window.seq - 40) / 100.0)
        assert window.t1 == pytest.approx(window.t0 + 99 / 100.0)


def test_window_times_are_none_without_a_clock() -> None:
    windower = SampleWindower(50)
    for t0, rate in [(None, None), (1.0, None), (None, 50.0)]:
        windows, _ = windower.add(f"s-{t0}-{rate}", stream(150), 0, t0=t0, rate_hz=rate)
        assert len(windows) == 2
        assert all(w.t0 is None and w.t1 is None for w in windows)


@settings(deadline=None, max_examples=50)
@given(
    hop=st.integers(1, WINDOW_LENGTH),
    lengths=run_lengths,
    rate=st.sampled_from([1.0, 50.0, 100.0, 104.0, 400.0]),
    t_start=st.floats(0, 2e9),
    clocked=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_window_times_over_many_runs(
    hop: int, lengths: list[int], rate: float, t_start: float, clocked: list[bool]
) -> None:
    """Runs carry t0 for their first sample (or not): windows get t0 of their first sample."""
    clocked[0] = True
    data = stream(sum(lengths))
    windower = SampleWindower(hop)
    got: list[CutWindow] = []
    position = 0
    for length, has_clock in zip(lengths, clocked, strict=False):
        t0 = t_start + position / rate if has_clock else None
        windows, _ = windower.add(
            "s", data[position : position + length], position, t0=t0, rate_hz=rate
        )
        got.extend(windows)
        position += length
    assert_same(got, expected_windows(data, 0, hop))
    for window in got:
        assert window.t0 == pytest.approx(t_start + window.seq / rate, abs=1e-6)
        assert window.t1 == pytest.approx(window.t0 + (WINDOW_LENGTH - 1) / rate, abs=1e-6)


def test_reset_drops_the_old_clock() -> None:
    windower = SampleWindower(100)
    windower.add("s", stream(50), 0, t0=100.0, rate_hz=10.0)
    windows, event = windower.add("s", stream(100), 0)
    assert event is not None
    assert event.kind is Discontinuity.RESET
    assert windows[0].t0 is None


# --- forget and buffered --------------------------------------------------------------------------


def test_buffered_counts_samples_held_for_the_next_window() -> None:
    windower = SampleWindower(30)
    assert windower.buffered("s") == 0
    windower.add("s", stream(80), 0)
    assert windower.buffered("s") == 80
    windows, _ = windower.add("s", stream(80), 80)
    assert [w.seq for w in windows] == [0, 30, 60]  # the next window starts at 90
    assert windower.buffered("s") == 70
    windower.add("s", stream(1), 160)
    assert windower.buffered("s") == 71
    assert windower.buffered("other") == 0


def test_forget_drops_a_sensor_and_its_sequence() -> None:
    windower = SampleWindower(100)
    windower.add("s", stream(90), 0)
    windower.add("t", stream(90), 0)
    windower.forget("s")
    windower.forget("never-seen")
    assert windower.buffered("s") == 0
    assert windower.buffered("t") == 90
    windows, event = windower.add("s", stream(100), 7_000)  # a fresh start, not a gap
    assert event is None
    assert [w.seq for w in windows] == [7_000]
