"""The node's HTTP contract as data (`ENDPOINTS`) and as an OpenAPI 3.1 document built from it.

Request and answer bodies are the pydantic models of `schemas.messages` (the window and the
result, shared with MQTT) and `schemas.http`; `openapi_document` asks pydantic for their JSON
Schemas, so the document cannot drift from what the node validates and serves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from schemas.http import (
    HTTP_API_VERSION,
    ApiError,
    Health,
    Liveness,
    Readiness,
    SelfTest,
    ServiceIndex,
    ServiceStatus,
)
from schemas.limits import BINARY_CONTENT_TYPE, BINARY_WINDOW_BYTES, FRAME_BYTES, MAX_WINDOW_BYTES
from schemas.messages import MotifResult, WindowMessage

Access = Literal["open", "token", "scrape"]
"""Who may call: anyone; a bearer token where the node has `http_token_file`; the scrape token
(`http_metrics_token_file`, else the token)."""

ERROR = ApiError


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One method and path of the node's HTTP side."""

    method: Literal["GET", "POST"]
    path: str
    summary: str
    access: Access
    responses: dict[int, tuple[type[BaseModel] | str | None, str]]
    """Status -> (body model, or a media type for a non-JSON body, or None; when)."""
    description: str = ""
    request: type[BaseModel] | None = None
    request_media: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        """`METHOD /path`."""
        return f"{self.method} {self.path}"


_UNAUTHORIZED = (ERROR, "No or a wrong `Authorization: Bearer TOKEN` (when the node has one)")

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "GET", "/", "Service discovery: name, version, endpoints, docs", "open",
        {200: (ServiceIndex, "Always")},
    ),
    Endpoint(
        "GET", "/healthz", "Can this node infer? (the sidecar's health check)", "open",
        {200: (Health, "A model serves"),
         503: (Health, "No model yet (first boot), starting, stopping, or the backend is being "
                       "rebuilt: `ok` is false and `reason` says why")},
        description="A sidecar client reads the status code as 'this node can infer'. For "
        "systemd and container health checks use /livez, which does not flap.",
    ),
    Endpoint(
        "GET", "/livez", "Liveness: the process answers, whatever the model's state", "open",
        {200: (Liveness, "Always, while the process serves HTTP")},
    ),
    Endpoint(
        "GET", "/readyz", "Readiness: broker link, serving, healthy backend, room in the queue",
        "open",
        {200: (Readiness, "Ready"), 503: (Readiness, "Not ready; `checks` names what fails")},
    ),
    Endpoint(
        "GET", "/status", "Model and device state, and which endpoints can answer", "token",
        {200: (ServiceStatus, "Always (also while waiting for a model)"), 401: _UNAUTHORIZED},
    ),
    Endpoint(
        "GET", "/metrics", "Prometheus metrics: imu_node_* and the sidecar's hailo_* set",
        "scrape",
        {200: ("text/plain; version=0.0.4", "Text exposition"), 401: _UNAUTHORIZED},
    ),
    Endpoint(
        "POST", "/infer", "One 100 x 9 window in, one result out (EdgeInfer)", "token",
        {200: (MotifResult, "The result, as published on MQTT (sensor_id `http`)"),
         400: (ERROR, "A malformed, invalid or non-finite window; `error` says which. A window "
                      "of other than 100 rows is 400 here (the FastAPI sidecar said 422)"),
         401: _UNAUTHORIZED,
         411: (ERROR, "No Content-Length"),
         413: (ERROR, f"A body over {MAX_WINDOW_BYTES} bytes"),
         500: (ERROR, "The backend failed on this window"),
         503: (ERROR, "No model yet, queue full (with Retry-After) or the node is stopping"),
         504: (ERROR, "No result within http_infer_timeout_s")},
        description=f"JSON (`{{\"x\": [[9 numbers] x 100]}}`), or a {BINARY_WINDOW_BYTES}-byte "
        f"(or {FRAME_BYTES}-byte headered) little-endian float32 frame with Content-Type "
        f"`application/octet-stream` or `{BINARY_CONTENT_TYPE}`. The window goes through the "
        "node's own queue and model, batched with MQTT traffic.",
        request=WindowMessage,
        request_media=("application/json", "application/octet-stream", BINARY_CONTENT_TYPE),
    ),
    Endpoint(
        "POST", "/test", "Self-test: a window of zeros through the queue and model", "token",
        {200: (SelfTest, "Inferred"),
         400: (ERROR, "A body other than none or `{}`"),
         401: _UNAUTHORIZED,
         500: (ERROR, "The backend failed"),
         503: (ERROR, "No model yet, queue full or stopping"),
         504: (ERROR, "No result within http_infer_timeout_s")},
        description="Takes no body (or `{}`).",
    ),
    Endpoint(
        "GET", "/openapi.json", "This API as an OpenAPI 3.1 document", "open",
        {200: ("application/json", "The document")},
    ),
    Endpoint(
        "GET", "/docs", "This API as a page (no scripts, no network: works offline)", "open",
        {200: ("text/html", "The page")},
    ),
)  # fmt: skip
"""Every endpoint, in the order the docs list them."""


def endpoint(method: str, path: str) -> Endpoint | None:
    """The endpoint at `method` `path`, if any."""
    return next((e for e in ENDPOINTS if e.method == method and e.path == path), None)


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of `ENDPOINTS`, component schemas from the pydantic models."""
    models = sorted({model for e in ENDPOINTS for model in _models(e)}, key=lambda m: m.__name__)
    refs, defs = models_json_schema(
        [(model, "validation" if model is WindowMessage else "serialization") for model in models],
        ref_template="#/components/schemas/{model}",
    )
    schemas = defs.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for e in ENDPOINTS:
        operation: dict[str, Any] = {
            "summary": e.summary,
            "operationId": _operation_id(e),
            "responses": {
                str(status): _response(body, when, refs)
                for status, (body, when) in e.responses.items()
            },
        }
        if e.description:
            operation["description"] = e.description
        if e.access != "open":
            operation["security"] = [{"bearer": []}, {}]  # {}: a node without a token
        if e.request is not None:
            ref = refs[(e.request, "validation")]
            content = {
                media: {"schema": ref if media == "application/json" else _binary_schema()}
                for media in e.request_media
            }
            operation["requestBody"] = {"required": True, "content": content}
        paths.setdefault(e.path, {})[e.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "imu-node HTTP API",
            "version": HTTP_API_VERSION,
            "description": (
                "The node's HTTP side: the endpoints of the FastAPI HailoRT TCN inference "
                "sidecar (/, /healthz, /status, /metrics, POST /infer, POST /test) beside the "
                "node's own (/livez, /readyz). Endpoints marked with bearer need "
                "`Authorization: Bearer TOKEN` when the node has http_token_file."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _models(e: Endpoint) -> list[type[BaseModel]]:
    found = [body for body, _ in e.responses.values() if isinstance(body, type)]
    return found + ([e.request] if e.request is not None else [])


def _response(
    body: type[BaseModel] | str | None, when: str, refs: dict[Any, Any]
) -> dict[str, Any]:
    answer: dict[str, Any] = {"description": when}
    if isinstance(body, type):
        answer["content"] = {"application/json": {"schema": refs[(body, "serialization")]}}
    elif body is not None:
        answer["content"] = {body: {"schema": {"type": "string"}}}
    return answer


def _binary_schema() -> dict[str, Any]:
    return {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "description": f"{BINARY_WINDOW_BYTES} bytes (or a {FRAME_BYTES}-byte headered frame)",
    }


def _operation_id(e: Endpoint) -> str:
    name = e.path.strip("/").replace(".", "_") or "index"
    return f"{e.method.lower()}_{name}"
