"""Bytes <-> messages.

Two decoders for sensor input: the pydantic models in `schemas.messages` are the contract, and a
fast path (orjson + numpy) decides the common case in a fraction of the time. The fast path only
ever *accepts*: whenever it has any doubt it defers to pydantic, which gives the exact verdict and
the reason. A property test proves both agree. Outbound messages are encoded with orjson.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeGuard, TypeVar

import numpy as np
import orjson
from numpy.typing import NDArray
from pydantic import BaseModel, ValidationError

from schemas.limits import (
    BINARY_CONTENT_TYPE,
    BINARY_WINDOW_BYTES,
    CHANNELS,
    FLOAT32_MAX,
    MAX_SAMPLES_BYTES,
    MAX_SAMPLES_PER_MESSAGE,
    MAX_WINDOW_BYTES,
    WINDOW_LENGTH,
)
from schemas.messages import ErrorKind, SamplesMessage, WindowMessage

FloatArray = NDArray[np.float32]
M = TypeVar("M", bound=BaseModel)
_INF = float("inf")
_WINDOW_FIELDS = frozenset(WindowMessage.model_fields)
_SAMPLES_FIELDS = frozenset(SamplesMessage.model_fields)


class InputRejectedError(ValueError):
    """A sensor message that breaks the contract, with a kind and a reason a person can act on."""

    def __init__(self, kind: ErrorKind, reason: str) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True, slots=True)
class DecodedWindow:
    """A validated window: (100, 9) float32 plus optional sequence number and start time."""

    x: FloatArray
    seq: int | None
    t0: float | None


@dataclass(frozen=True, slots=True)
class DecodedSamples:
    """A validated run of samples: (n, 9) float32."""

    samples: FloatArray
    seq: int
    t0: float | None
    rate_hz: float | None


def encode(message: BaseModel) -> bytes:
    """Serialise any message model to compact JSON bytes."""
    return orjson.dumps(message.model_dump(mode="json", exclude_none=False))


def encode_dict(payload: dict[str, Any]) -> bytes:
    """Serialise a plain dict (numpy arrays allowed) to compact JSON bytes."""
    return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)


def is_binary_window(payload: bytes, content_type: str | None) -> bool:
    """Whether a `window` payload is a raw float32 frame rather than JSON.

    The MQTT 5 content type decides when present. Without it (MQTT 3.1.1 sensors), a payload of
    exactly 3600 bytes whose first byte is not `{` is a frame: JSON windows always start with `{`.
    """
    if content_type:
        return content_type == BINARY_CONTENT_TYPE
    return len(payload) == BINARY_WINDOW_BYTES and payload[:1] != b"{"


def decode_binary_window(payload: bytes) -> DecodedWindow:
    """Decode a 3600-byte little-endian float32 frame (100 rows x 9 channels, row-major)."""
    if len(payload) != BINARY_WINDOW_BYTES:
        raise InputRejectedError(
            ErrorKind.MALFORMED,
            f"binary window is {len(payload)} bytes; a frame is exactly {BINARY_WINDOW_BYTES} "
            f"({WINDOW_LENGTH} x {CHANNELS} little-endian float32)",
        )
    x = np.frombuffer(payload, dtype="<f4").reshape(WINDOW_LENGTH, CHANNELS).astype(np.float32)
    if not np.isfinite(x).all():
        row, col = (int(i) for i in np.argwhere(~np.isfinite(x))[0])
        raise InputRejectedError(
            ErrorKind.NON_FINITE, f"binary window has NaN or infinity at row {row}, channel {col}"
        )
    return DecodedWindow(x=x, seq=None, t0=None)


def decode_any_window(payload: bytes, content_type: str | None) -> DecodedWindow:
    """Decode a window in either form (JSON or binary frame), as `is_binary_window` tells."""
    if is_binary_window(payload, content_type):
        return decode_binary_window(payload)
    return decode_window(payload)


def decode_window(payload: bytes) -> DecodedWindow:
    """Decode and validate a JSON window message; raises InputRejectedError with the reason."""
    if len(payload) > MAX_WINDOW_BYTES:
        raise InputRejectedError(
            ErrorKind.OVERSIZED,
            f"window payload is {len(payload)} bytes; the limit is {MAX_WINDOW_BYTES}. "
            "Send one 100 x 9 window per message",
        )
    fast = _fast_window(payload)
    if fast is not None:
        return fast
    message = _validate(WindowMessage, payload)
    return DecodedWindow(x=np.asarray(message.x, dtype=np.float32), seq=message.seq, t0=message.t0)


def decode_samples(payload: bytes) -> DecodedSamples:
    """Decode and validate a samples message; raises InputRejectedError with the reason."""
    if len(payload) > MAX_SAMPLES_BYTES:
        raise InputRejectedError(
            ErrorKind.OVERSIZED,
            f"samples payload is {len(payload)} bytes; the limit is {MAX_SAMPLES_BYTES}. "
            f"Send at most {MAX_SAMPLES_PER_MESSAGE} samples per message",
        )
    fast = _fast_samples(payload)
    if fast is not None:
        return fast
    message = _validate(SamplesMessage, payload)
    return DecodedSamples(
        samples=np.asarray(message.samples, dtype=np.float32),
        seq=message.seq,
        t0=message.t0,
        rate_hz=message.rate_hz,
    )


def _validate(model: type[M], payload: bytes) -> M:
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        raise _rejection(exc) from None


def _rejection(exc: ValidationError) -> InputRejectedError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    if first["type"] == "json_invalid":
        return InputRejectedError(ErrorKind.MALFORMED, f"payload is not valid JSON: {first['msg']}")
    kind = ErrorKind.INVALID
    if any(e["type"] == "finite_number" for e in errors):
        kind = ErrorKind.NON_FINITE
        first = next(e for e in errors if e["type"] == "finite_number")
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    msg = str(first["msg"]).removeprefix("Value error, ")
    reason = f"{where}: {msg}" if where and not msg.startswith(f"{where} ") else msg
    if len(errors) > 1:
        reason += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return InputRejectedError(kind, reason)


def _numeric_rows(value: object, max_rows: int) -> FloatArray | None:
    """Rows of numbers as a float32 array, or None when anything needs a closer look."""
    if not isinstance(value, list) or not 0 < len(value) <= max_rows:
        return None
    try:
        array = np.asarray(value)
    except ValueError:  # ragged rows
        return None
    if array.dtype.kind not in "fi" or array.ndim != 2 or array.shape[1] != CHANNELS:
        return None
    wide = array.astype(np.float64)  # ints round once, through float64, as pydantic does
    if not (np.abs(wide) <= FLOAT32_MAX).all():  # beyond float32: let pydantic name the value
        return None
    return wide.astype(np.float32)


def _may_hold_booleans(payload: bytes) -> bool:
    """numpy would read `true` as 1.0: leave any payload with a `u` or `f` to pydantic.

    No field name of the contract holds either letter and numbers never do, so this two-memchr
    test costs ~2 us where a search for the words costs ~25 us on a 17 KB window.
    """
    return b"u" in payload or b"f" in payload


def _is_count(value: object) -> TypeGuard[int]:
    return type(value) is int and 0 <= value < 2**63


def _is_time(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < _INF


def _fast_window(payload: bytes) -> DecodedWindow | None:
    data = _json_object(payload, _WINDOW_FIELDS)
    if data is None:
        return None
    seq, t0 = data.get("seq"), data.get("t0")
    if (seq is not None and not _is_count(seq)) or (t0 is not None and not _is_time(t0)):
        return None
    x = _numeric_rows(data.get("x"), WINDOW_LENGTH)
    if x is None or x.shape[0] != WINDOW_LENGTH:
        return None
    return DecodedWindow(x=x, seq=seq, t0=None if t0 is None else float(t0))


def _fast_samples(payload: bytes) -> DecodedSamples | None:
    data = _json_object(payload, _SAMPLES_FIELDS)
    if data is None:
        return None
    seq, t0, rate = data.get("seq"), data.get("t0"), data.get("rate_hz")
    valid_rate = rate is None or (_is_time(rate) and 0 < rate <= 10_000)
    if not _is_count(seq) or (t0 is not None and not _is_time(t0)) or not valid_rate:
        return None
    samples = _numeric_rows(data.get("samples"), MAX_SAMPLES_PER_MESSAGE)
    if samples is None:
        return None
    return DecodedSamples(
        samples=samples,
        seq=seq,
        t0=None if t0 is None else float(t0),
        rate_hz=float(rate) if _is_time(rate) else None,
    )


def _json_object(payload: bytes, fields: frozenset[str]) -> dict[str, object] | None:
    """The payload as a JSON object of known fields only, or None to let pydantic judge it.

    Unknown fields go to pydantic: they may nest deeper than its parser allows.
    """
    if _may_hold_booleans(payload):
        return None
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.keys() <= fields else None
