"""The recording file format: header and message lines, reading and writing, gzip or plain.

A recording is JSON lines, gzip-compressed when the file name ends in `.gz`. The first line is
a header, then one line per message in arrival order:

    {"format": "imu-recording", "version": 1, "created_at": "2025-...Z", "broker": "mqtt://...",
     "topics": ["imu/+/window"]}
    {"t": 0.5123, "topic": "imu/s1/window", "payload": {"x": [[...]], "seq": 7}}
    {"t": 0.5311, "topic": "imu/s2/window", "payload_b64": "AAAg...", "content_type": "..."}

`t` is seconds since the recorder started. A payload that is a JSON object is stored as that
object (orjson re-serialises it on replay: same values, compact spacing); anything else (binary
float32 frames, JSON scalars, text, numbers orjson could not keep exactly) is stored base64 and
replayed byte for byte. `content_type` (MQTT 5) is kept when the publisher set it.
"""

from __future__ import annotations

import base64
import binascii
import gzip
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, cast

import orjson

from common.errors import EdgeError

logger = logging.getLogger("fleet.recording")

FORMAT: Final = "imu-recording"
VERSION: Final = 1
_GZIP_MAGIC: Final = b"\x1f\x8b"
_DIGIT_CLASSES: Final = bytes(
    ord("0") if chr(c).isdigit() and c < 128 else ord(".") if chr(c) in ".eE" else ord(" ")
    for c in range(256)
)
_LONG_INTEGER: Final = b" " + b"0" * 19
"""A run of 19+ digits not inside a fraction or exponent, once `_DIGIT_CLASSES` is applied.

orjson reads integers beyond 64 bits as floats, so payloads holding one are kept as bytes (a
match inside a string only costs readability, never exactness)."""
_NOT_JSON: Final = object()
"""What `_loads` returns for bytes that are not JSON (`None` is JSON `null`)."""


class RecordingError(EdgeError):
    """A file that is not a readable recording; the message says which file, line and why."""


@dataclass(frozen=True, slots=True)
class RecordingHeader:
    """The first line of a recording."""

    created_at: str
    broker: str
    topics: list[str]
    version: int = VERSION


@dataclass(frozen=True, slots=True)
class RecordedMessage:
    """One recorded message: payload bytes as they will be replayed."""

    t: float
    """Seconds since the recorder started."""
    topic: str
    payload: bytes
    content_type: str | None = None
    is_json: bool = False
    """True when the file holds the payload as a JSON object (re-serialised compactly)."""
    line: int = 0
    """Line number in the file (1 is the header)."""


# --- writing ---------------------------------------------------------------------------------


def encode_header(header: RecordingHeader) -> bytes:
    """The header line (with its newline)."""
    return (
        orjson.dumps(
            {
                "format": FORMAT,
                "version": header.version,
                "created_at": header.created_at,
                "broker": header.broker,
                "topics": header.topics,
            }
        )
        + b"\n"
    )


def encode_message(t: float, topic: str, payload: bytes, content_type: str | None = None) -> bytes:
    """One message line (with its newline): a JSON object payload inline, anything else base64."""
    entry: dict[str, Any] = {"t": round(t, 6), "topic": topic}
    if content_type:
        entry["content_type"] = content_type
    document = _json_object(payload)
    if document is not None:
        try:
            return orjson.dumps({**entry, "payload": document}) + b"\n"
        except orjson.JSONEncodeError:  # nested deeper than orjson writes: keep the bytes
            pass
    entry["payload_b64"] = base64.b64encode(payload).decode("ascii")
    return orjson.dumps(entry) + b"\n"


def _json_object(payload: bytes) -> dict[str, Any] | None:
    """The payload as a JSON object when orjson can re-serialise it without changing a value."""
    if payload.lstrip()[:1] != b"{":
        return None
    if _LONG_INTEGER in payload.translate(_DIGIT_CLASSES):
        return None
    document = _loads(payload)
    return document if isinstance(document, dict) else None


def open_for_writing(out: Path) -> IO[bytes]:
    """Create a recording for writing, gzip-compressed when the name ends in `.gz`."""
    if out.name.endswith(".gz"):
        return cast(IO[bytes], gzip.open(out, "wb", compresslevel=6))
    return out.open("wb")


# --- reading ---------------------------------------------------------------------------------


def open_recording(path: Path) -> IO[bytes]:
    """Open a recording (or any JSON-lines file) for reading, gunzipping when it is gzip."""
    with path.open("rb") as probe:
        compressed = probe.read(2) == _GZIP_MAGIC
    return cast(IO[bytes], gzip.open(path, "rb")) if compressed else path.open("rb")


def is_recording_header(document: object) -> bool:
    """True when a parsed first line is a recording header (of any version)."""
    return isinstance(document, dict) and document.get("format") == FORMAT


def read_header(path: Path) -> RecordingHeader:
    """The header of a recording; raises RecordingError when the file is not one."""
    with open_recording(path) as stream:
        return _parse_header(path, _first_line(path, stream))


def read_recording(path: Path) -> Iterator[RecordedMessage]:
    """The messages of a recording in file order, validating the header and every line.

    Raises RecordingError (with the line number) for a file that is not a recording or a line
    that is not a message. A file cut short by a killed recorder (a partial last line, or a gzip
    stream without its end) yields every complete message and logs a warning.
    """
    with open_recording(path) as stream:
        _parse_header(path, _first_line(path, stream))
        number = 1
        try:
            for raw in stream:
                number += 1
                if not raw.strip():
                    continue
                if not raw.endswith(b"\n") and _loads(raw) is _NOT_JSON:
                    logger.warning(
                        "%s:%d: partial last line (the recorder was stopped mid-write); "
                        "ignoring it",
                        path,
                        number,
                    )
                    return
                yield _parse_message(path, number, raw)
        except EOFError:
            logger.warning(
                "%s ends early after line %d (gzip stream not closed: the recorder was "
                "killed); later messages are lost",
                path,
                number,
            )


def _loads(raw: bytes) -> object:
    """`raw` parsed as JSON, or `_NOT_JSON` when it is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _first_line(path: Path, stream: IO[bytes]) -> bytes:
    try:
        line = stream.readline()
    except (EOFError, gzip.BadGzipFile) as exc:
        msg = f"{path} is not an imu recording: cannot read it ({exc})"
        raise RecordingError(msg) from exc
    if not line.strip():
        msg = f"{path} is not an imu recording: it is empty (a recording starts with a header line)"
        raise RecordingError(msg)
    return line


def _parse_header(path: Path, line: bytes) -> RecordingHeader:
    expected = f'{{"format": "{FORMAT}", "version": {VERSION}, ...}}'
    document = _loads(line)
    if not is_recording_header(document):
        snippet = line[:60].decode("utf-8", "replace").rstrip()
        msg = (
            f"{path} is not an imu recording: its first line should be a header like "
            f"{expected}, found {snippet!r}"
        )
        raise RecordingError(msg)
    assert isinstance(document, dict)
    version = document.get("version")
    if version != VERSION:
        msg = (
            f"{path} is an imu recording of version {version!r}; this tool reads version {VERSION}"
        )
        raise RecordingError(msg)
    topics = document.get("topics")
    if not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
        msg = f"{path}: the recording header's 'topics' must be a list of topic filters"
        raise RecordingError(msg)
    return RecordingHeader(
        created_at=str(document.get("created_at", "")),
        broker=str(document.get("broker", "")),
        topics=topics,
        version=VERSION,
    )


def _parse_message(path: Path, number: int, raw: bytes) -> RecordedMessage:
    where = f"{path}:{number}"
    try:
        entry = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        msg = f"{where}: not a recorded message: {exc}"
        raise RecordingError(msg) from exc
    if not isinstance(entry, dict):
        msg = f"{where}: not a recorded message: expected a JSON object"
        raise RecordingError(msg)
    t, topic, content_type = entry.get("t"), entry.get("topic"), entry.get("content_type")
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        msg = f"{where}: 't' must be a number of seconds, found {t!r}"
        raise RecordingError(msg)
    if not isinstance(topic, str) or not topic:
        msg = f"{where}: 'topic' must be a non-empty string, found {topic!r}"
        raise RecordingError(msg)
    if content_type is not None and not isinstance(content_type, str):
        msg = f"{where}: 'content_type' must be a string, found {content_type!r}"
        raise RecordingError(msg)
    if "payload" in entry and "payload_b64" in entry:
        msg = f"{where}: a message has 'payload' or 'payload_b64', not both"
        raise RecordingError(msg)
    if "payload" in entry:
        document = entry["payload"]
        if not isinstance(document, dict):
            msg = f"{where}: 'payload' must be a JSON object (other payloads are 'payload_b64')"
            raise RecordingError(msg)
        payload, is_json = orjson.dumps(document), True
    elif isinstance(entry.get("payload_b64"), str):
        try:
            payload = base64.b64decode(entry["payload_b64"], validate=True)
        except binascii.Error as exc:
            msg = f"{where}: 'payload_b64' is not valid base64: {exc}"
            raise RecordingError(msg) from exc
        is_json = False
    else:
        msg = f"{where}: a message needs 'payload' (JSON object) or 'payload_b64' (string)"
        raise RecordingError(msg)
    return RecordedMessage(float(t), topic, payload, content_type, is_json, number)
