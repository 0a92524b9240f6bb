"""Numeric constants of the contract: window geometry, model dimensions and payload caps."""

from typing import Final

WINDOW_LENGTH: Final = 100
"""Samples per window."""
CHANNELS: Final = 9
"""IMU channels per sample."""
CHANNEL_ORDER: Final = ("ax", "ay", "az", "gx", "gy", "gz", "mx", "my", "mz")
"""Channel order of every sample row: accelerometer, gyroscope, magnetometer."""
LATENT_DIM: Final = 64
"""Size of the encoder's latent vector."""
MOTIF_COUNT: Final = 12
"""Number of motif scores per result."""

BINARY_WINDOW_BYTES: Final = WINDOW_LENGTH * CHANNELS * 4
"""Size of a binary window frame: 100 x 9 little-endian float32, row-major."""
BINARY_CONTENT_TYPE: Final = "application/x-imu-window-f32"
"""MQTT 5 content type that marks a binary window frame."""
FRAME_MAGIC: Final = b"\x89IMU"
"""First 4 bytes of a headered binary window frame (docs/topics.md, "Binary frames").

0x89 is not ASCII and cannot start a UTF-8 (so a JSON) text: a frame is never read as JSON."""
FRAME_VERSION: Final = 1
"""Version byte of the headered frame this node writes and reads."""
FRAME_HEADER_BYTES: Final = 16
"""Header of a binary window frame: magic (4), version (1), flags (1), reserved (2), seq (8)."""
FRAME_BYTES: Final = FRAME_HEADER_BYTES + BINARY_WINDOW_BYTES
"""Size of a headered binary window frame (version 1): 3616 bytes."""
FRAME_FLAG_SEQ: Final = 0x01
"""Frame flag: the header's seq field holds the window's seq (clear: the frame has no seq)."""

MAX_WINDOW_BYTES: Final = 64 * 1024
"""Largest accepted JSON window payload (a 100 x 9 window is 5-20 KB)."""
MAX_SAMPLES_PER_MESSAGE: Final = 1000
"""Most samples accepted in one `samples` message (10 s at 100 Hz)."""
MAX_SAMPLES_BYTES: Final = 256 * 1024
"""Largest accepted `samples` payload."""
FLOAT32_MAX: Final = 3.4028234663852886e38
"""Largest finite float32: every sample value must fit."""
SENSOR_ID_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
"""Sensor and node ids: safe as one MQTT topic level and as a file name."""
