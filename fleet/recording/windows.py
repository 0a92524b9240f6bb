"""A recording's window messages as a calibration set (see `fleet.bundles.calibration`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from fleet.recording.format import read_recording
from fleet.recording.topics import is_window_topic
from schemas.codec import (
    InputRejectedError,
    decode_binary_window,
    decode_window,
    is_binary_window,
)
from schemas.limits import CHANNELS, WINDOW_LENGTH

logger = logging.getLogger("fleet.recording")


def recording_windows(path: Path) -> tuple[NDArray[np.float32], list[str]]:
    """The windows of a recording, as (N, 100, 9) float32, and why other window messages failed.

    Every `*/window` message (JSON or binary float32 frame) is decoded with the node's own
    decoders; one that is not a valid window is skipped, and the second value holds one reason
    per skipped message (`path:line topic: reason`), also logged as a warning with the count.
    Messages on other topics (samples, motifs, ...) are ignored.
    """
    windows: list[NDArray[np.float32]] = []
    skipped: list[str] = []
    for message in read_recording(path):
        if not is_window_topic(message.topic):
            continue
        try:
            if not message.is_json and is_binary_window(message.payload, message.content_type):
                decoded = decode_binary_window(message.payload)
            else:
                decoded = decode_window(message.payload)
        except InputRejectedError as exc:
            skipped.append(f"{path}:{message.line} {message.topic}: {exc.reason}")
            continue
        windows.append(decoded.x)
    if skipped:
        logger.warning(
            "%s: skipped %d window message(s) that are not valid windows; first: %s",
            path,
            len(skipped),
            skipped[0],
        )
    if not windows:
        return np.empty((0, WINDOW_LENGTH, CHANNELS), np.float32), skipped
    return np.stack(windows).astype(np.float32, copy=False), skipped
