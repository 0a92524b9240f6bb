"""The node's own errors. Everything raised on purpose derives from the one root, `EdgeError`
(schemas/errors.py); the model runtime's errors are in runtime/errors.py."""

from __future__ import annotations

from common.errors import EdgeError


class ConfigError(EdgeError):
    """The configuration is invalid; the message says which setting and how to fix it."""


__all__ = ["ConfigError"]
