"""Write the JSON Schema of every message (and the bundle manifest) to a folder.

Usage: `python -m schemas.export [--out docs/schemas]`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import orjson
from pydantic import BaseModel

from schemas.manifest import Manifest
from schemas.messages import ALL_MESSAGES

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path("docs/schemas")


def schema_documents() -> dict[str, bytes]:
    """File name -> pretty JSON Schema, for every public model."""
    models: tuple[type[BaseModel], ...] = (*ALL_MESSAGES, Manifest)
    return {
        f"{model.__name__}.schema.json": orjson.dumps(
            model.model_json_schema(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
        )
        + b"\n"
        for model in models
    }


def write_schemas(out: Path) -> list[Path]:
    """Write every schema into `out` (created if missing); returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, body in schema_documents().items():
        path = out / name
        path.write_bytes(body)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="python -m schemas.export", description="Write JSON Schema for every message."
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder (%(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for path in write_schemas(args.out):
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
