"""Structured logging: one JSON object per line on stderr."""

from __future__ import annotations

import logging
import sys
import time

import orjson

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonLineFormatter(logging.Formatter):
    """Formats records as JSON lines: ts, level, logger, thread, msg, extras, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record."""
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(level: str = "INFO", *, json_lines: bool = True) -> None:
    """Send the root logger to stderr as JSON lines (or plain text for interactive tools)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonLineFormatter() if json_lines else logging.Formatter("%(levelname)s %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
