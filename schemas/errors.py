"""The root of every error the project raises on purpose, and readable summaries of pydantic
validation errors for people rather than programs.

The root lives here, on the lowest floor, so that every layer (schemas, common, runtime, node,
fleet) can derive from it: the CLIs catch `EdgeError` and print one line.
"""

from __future__ import annotations

from pydantic import ValidationError


class EdgeError(Exception):
    """Root of every error the node, the fleet tools and their shared parts raise on purpose."""


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
