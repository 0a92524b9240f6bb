"""Calibration sets: recorded windows from a file, or the simulator's activities by default.

Accepted files: `.npy` holding (N, 100, 9); `.npz` with a `windows` (or `x`) array and optional
`labels`; `.jsonl` (or `.ndjson`, either optionally `.gz`) with one window message per line
(`{"x": [[...9]...100], ...}`), optionally wrapped as `{"payload": {...}}` (lines whose `topic`
is not a `*/window` topic are ignored), or an `imu-fleet record` recording (see
`fleet.recording`), whose window messages, JSON or binary, are the set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from numpy.typing import NDArray

from common.errors import BundleError
from fleet.recording import (
    RecordingError,
    is_recording_header,
    is_window_topic,
    open_recording,
    recording_windows,
)
from schemas.codec import InputRejectedError, decode_window
from schemas.limits import CHANNELS, MOTIF_COUNT, WINDOW_LENGTH

logger = logging.getLogger(__name__)

SIMULATED_PER_ACTIVITY = 64
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
MIN_WINDOWS = MOTIF_COUNT
"""Fewest calibration windows accepted: one per motif prototype."""


@dataclass(frozen=True, slots=True)
class CalibrationSet:
    """Raw windows (N, 100, 9) float32, optional label per window, and where they came from."""

    windows: NDArray[np.float32]
    labels: list[str] | None
    source: str


def simulated_calibration(per_activity: int = SIMULATED_PER_ACTIVITY) -> CalibrationSet:
    """Windows of every simulated activity (rest, walk, run, turn, stairs, shake)."""
    from fleet.simulate.imu_signals import calibration_set  # noqa: PLC0415 (optional heavy path)

    windows, labels = calibration_set(per_activity)
    return CalibrationSet(windows, [str(a) for a in labels], f"simulator x{len(windows)}")


def load_calibration(path: Path) -> CalibrationSet:
    """Load a calibration file (see module docstring); raises BundleError with what is wrong."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            windows, labels = np.load(path, allow_pickle=False), None
        elif suffix == ".npz":
            windows, labels = _from_npz(path)
        elif path.name.lower().endswith(JSONL_SUFFIXES):
            windows, labels = _from_jsonl(path), None
        else:
            msg = f"calibration file {path} must be .npy, .npz or .jsonl (or .jsonl.gz)"
            raise BundleError(msg)
    except (OSError, EOFError, ValueError, RecordingError) as exc:
        msg = f"cannot read calibration file {path}: {exc}"
        raise BundleError(msg) from exc
    windows = np.asarray(windows, dtype=np.float32)
    if windows.ndim != 3 or windows.shape[1:] != (WINDOW_LENGTH, CHANNELS):
        msg = f"calibration windows have shape {windows.shape}; expected (N, 100, 9)"
        raise BundleError(msg)
    if len(windows) < MIN_WINDOWS:
        msg = (
            f"calibration file {path} has {len(windows)} windows; the motif head needs at least "
            f"{MIN_WINDOWS} (hundreds recommended)"
        )
        raise BundleError(msg)
    if labels is not None and len(labels) != len(windows):
        msg = f"calibration file {path} has {len(labels)} labels for {len(windows)} windows"
        raise BundleError(msg)
    if not np.isfinite(windows).all():
        msg = f"calibration file {path} holds NaN or infinity"
        raise BundleError(msg)
    return CalibrationSet(windows, labels, path.name)


def _from_npz(path: Path) -> tuple[NDArray[np.float32], list[str] | None]:
    with np.load(path, allow_pickle=False) as archive:
        key = "windows" if "windows" in archive else "x"
        if key not in archive:
            msg = f"{path} has no 'windows' or 'x' array (found {list(archive.keys())})"
            raise BundleError(msg)
        labels = [str(v) for v in archive["labels"]] if "labels" in archive else None
        return archive[key], labels


def _from_jsonl(path: Path) -> NDArray[np.float32]:
    """Window messages, one per line, or the windows of a recording (header on the first line)."""
    rows = []
    ignored = 0
    with open_recording(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = orjson.loads(line)
                if number == 1 and is_recording_header(record):
                    return _from_recording(path)
                if isinstance(record, dict) and not is_window_topic(
                    str(record.get("topic", "window"))
                ):
                    ignored += 1
                    continue
                payload = record.get("payload", record) if isinstance(record, dict) else record
                rows.append(decode_window(orjson.dumps(payload)).x)
            except (orjson.JSONDecodeError, InputRejectedError) as exc:
                msg = f"{path}:{number}: not a window message: {exc}"
                raise BundleError(msg) from exc
    if ignored:
        logger.info("%s: ignored %d line(s) on topics other than */window", path, ignored)
    return np.stack(rows) if rows else np.empty((0, WINDOW_LENGTH, CHANNELS), np.float32)


def _from_recording(path: Path) -> NDArray[np.float32]:
    """A recording's window messages (invalid ones are left out with a logged warning)."""
    windows, _skipped = recording_windows(path)
    return windows
