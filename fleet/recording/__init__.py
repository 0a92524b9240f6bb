"""Record MQTT traffic to a file and replay it, and read recorded windows as a calibration set.

- `format`: the file format (JSON lines, optionally gzip): header, message lines, reading.
- `recorder`: `record`, subscribing and handing each message to the writer thread (`writer`).
- `replayer`: `replay`, republishing on the recorded schedule, with topic rewrites.
- `windows`: `recording_windows`, the window messages as a calibration set (used by
  `fleet.bundles.calibration.load_calibration`).
- `topics`, `stats`, `broker`: topic filters, progress counts and the MQTT session they share.
"""

from __future__ import annotations

from fleet.recording.format import (
    RecordedMessage,
    RecordingError,
    RecordingHeader,
    encode_header,
    encode_message,
    is_recording_header,
    open_recording,
    read_header,
    read_recording,
)
from fleet.recording.recorder import record
from fleet.recording.replayer import parse_rewrite, replay
from fleet.recording.stats import RecordStats, ReplayStats
from fleet.recording.topics import is_window_topic, subscription_filters
from fleet.recording.windows import recording_windows

__all__ = [
    "RecordStats",
    "RecordedMessage",
    "RecordingError",
    "RecordingHeader",
    "ReplayStats",
    "encode_header",
    "encode_message",
    "is_recording_header",
    "is_window_topic",
    "open_recording",
    "parse_rewrite",
    "read_header",
    "read_recording",
    "record",
    "recording_windows",
    "replay",
    "subscription_filters",
]
