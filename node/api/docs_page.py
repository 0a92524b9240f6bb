"""`GET /docs`: the OpenAPI document as one HTML page, rendered here.

No scripts, fonts or styles from a CDN: a Pi on a closed network has none. The page is built
from the same document `/openapi.json` serves, and its Content-Security-Policy lets it load
nothing at all.
"""

from __future__ import annotations

from html import escape
from typing import Any

import orjson

CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
"""The page's Content-Security-Policy: inline styles only, nothing fetched."""

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:60rem;padding:0 1rem;color:#222}
code,pre{font:13px ui-monospace,monospace}pre{background:#f5f5f5;padding:.6rem;overflow:auto}
.op{border:1px solid #ddd;border-radius:6px;margin:1rem 0;padding:.4rem .9rem}
.m{display:inline-block;min-width:3.5rem;font-weight:700}.lock{color:#a60}
table{border-collapse:collapse}td{border-top:1px solid #eee;padding:.2rem .6rem;vertical-align:top}
"""


def render_docs(document: dict[str, Any]) -> bytes:
    """The page for an OpenAPI 3.1 `document` (as `schemas.openapi.openapi_document` builds)."""
    info = document["info"]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>{escape(info['title'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{escape(info['title'])} <small>{escape(info['version'])}</small></h1>",
        f"<p>{escape(info['description'])}</p>",
        "<p>Machine-readable: <a href=/openapi.json><code>/openapi.json</code></a>.</p>",
        "<h2>Endpoints</h2>",
    ]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            parts.append(_operation(path, method, operation))
    parts.append("<h2>Schemas</h2>")
    for name, schema in document["components"]["schemas"].items():
        pretty = orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode()
        parts.append(
            f"<details id={escape(name)}><summary><code>{escape(name)}</code></summary>"
            f"<pre>{escape(pretty)}</pre></details>"
        )
    parts.append("</body></html>")
    return "\n".join(parts).encode()


def _operation(path: str, method: str, operation: dict[str, Any]) -> str:
    lock = " <span class=lock>bearer token</span>" if "security" in operation else ""
    rows = []
    for status, response in operation["responses"].items():
        rows.append(
            f"<tr><td><code>{escape(status)}</code></td><td>{_body(response)}</td>"
            f"<td>{escape(response['description'])}</td></tr>"
        )
    request = operation.get("requestBody")
    body = (
        f"<p>Body: {', '.join(f'<code>{escape(media)}</code>' for media in request['content'])}"
        f" ({_body(request)})</p>"
        if request
        else ""
    )
    description = operation.get("description")
    return (
        f"<div class=op><p><span class=m>{escape(method.upper())}</span> "
        f"<code>{escape(path)}</code> {escape(operation['summary'])}{lock}</p>"
        + (f"<p>{escape(description)}</p>" if description else "")
        + body
        + f"<table>{''.join(rows)}</table></div>"
    )


def _body(part: dict[str, Any]) -> str:
    """The schema names (linked) or media types of a request or response."""
    names = []
    for media, content in part.get("content", {}).items():
        ref = content.get("schema", {}).get("$ref")
        if ref:
            name = ref.rsplit("/", 1)[1]
            names.append(f"<a href=#{escape(name)}><code>{escape(name)}</code></a>")
        else:
            names.append(f"<code>{escape(media)}</code>")
    return ", ".join(dict.fromkeys(names))
