"""Readable summaries of pydantic validation errors, for people rather than programs."""

from __future__ import annotations

from pydantic import ValidationError


def describe_validation_error(exc: ValidationError, what: str = "input") -> str:
    """`invalid {what}:` and one line per problem: `field.path: what is wrong`."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or what
        msg = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            msg = "unknown setting (check the spelling; see --help)"
        lines.append(f"{where}: {msg}")
    return f"invalid {what}:\n  " + "\n  ".join(lines)
