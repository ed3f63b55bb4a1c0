"""The OpenAPI 3.1 document and the browsable page, both built from the route table at start-up."""

from __future__ import annotations

import html
import re
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from vfed.common.api.errors import ErrorDocument
from vfed.server.api.meta import server_version
from vfed.server.routes import API, OPS, Op

REF = "#/components/schemas/{model}"


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorDocument"}}},
    }


def _parameters(op: Op, schemas: dict[str, Any]) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = []
    for name in re.findall(r"{(\w+)}", op.path):
        schema = (
            {"type": "integer", "minimum": 1}
            if name == "id"
            else {"type": "string", "pattern": "^[0-9a-f]{32}$"}
        )
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    if op.query is not None:
        qschema = op.query.model_json_schema()
        for name, prop in qschema.get("properties", {}).items():
            params.append({"name": name, "in": "query", "required": False, "schema": _inline(prop, qschema)})
    if op.binary_out:
        params.append(
            {
                "name": "Range",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": r"^bytes=\d+-\d*$"},
            }
        )
    return params


def _inline(prop: dict[str, Any], parent: dict[str, Any]) -> dict[str, Any]:
    """Resolve local $defs refs inside a query property (query schemas are flat)."""
    text = str(prop)
    if "$ref" not in text:
        return prop
    defs = parent.get("$defs", {})
    if "$ref" in prop:
        return dict(defs[prop["$ref"].rsplit("/", 1)[1]])
    if "anyOf" in prop:
        return {**prop, "anyOf": [_inline(p, parent) for p in prop["anyOf"]]}
    return prop


def _multipart(body: type[BaseModel]) -> dict[str, Any]:
    """A `task` part holding the JSON body and an `input` part with the bytes (streamed, never base64)."""
    return {
        "schema": {
            "type": "object",
            "properties": {
                "task": {"$ref": REF.format(model=body.__name__)},
                "input": {"type": "string", "format": "binary"},
            },
            "required": ["task", "input"],
        },
        "encoding": {
            "task": {"contentType": "application/json"},
            "input": {"contentType": "application/octet-stream"},
        },
    }


def _operation(op: Op) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if op.binary_out:
        content = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
        responses["200"] = {"description": "the bytes", "content": content}
        responses["206"] = {"description": "a range of the bytes", "content": content}
    elif op.response is not None:
        schema = {"$ref": REF.format(model=op.response.__name__)}
        responses[str(op.status)] = {
            "description": "success",
            "content": {"application/json": {"schema": schema}},
        }
    elif op.status == 204:
        responses["204"] = {"description": "done; no body"}
    for code, text in (
        ("400", "bad request"),
        ("404", "not found"),
        ("409", "conflict"),
        ("422", "invalid input"),
    ):
        responses[code] = _error(text)
    if op.auth:
        responses["401"] = _error("no or bad credentials")
        responses["403"] = _error("not allowed")
    if op.binary_in or op.multipart_in:
        responses["413"] = _error("too large")
    doc: dict[str, Any] = {
        "summary": op.summary,
        "operationId": op.handler.__name__,
        "tags": [op.tag],
        "parameters": _parameters(op, {}),
        "responses": responses,
    }
    if op.body is not None:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=op.body.__name__)}}},
        }
    if op.multipart_in and op.body is not None:
        doc["requestBody"]["content"]["multipart/form-data"] = _multipart(op.body)
    if op.binary_in:
        doc["requestBody"] = {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    if op.auth:
        doc["security"] = [{"bearer": []}]
    return doc


def build_openapi() -> dict[str, Any]:
    """The whole document: paths from `OPS`, component schemas from the pydantic models."""
    models: set[type[BaseModel]] = {ErrorDocument}
    for op in OPS:
        models.update(m for m in (op.body, op.response) if m is not None)
    ordered = sorted(models, key=lambda m: m.__name__)
    modes = [(m, "validation") for m in ordered if m.model_config.get("extra") == "forbid"]
    modes += [(m, "serialization") for m in ordered if m.model_config.get("extra") != "forbid"]
    _, defs = models_json_schema(modes, ref_template=REF)  # type: ignore[arg-type]
    paths: dict[str, dict[str, Any]] = {}
    for op in OPS:
        paths.setdefault(API + op.path, {})[op.method.lower()] = _operation(op)
    return {
        "openapi": "3.1.0",
        "info": {"title": "vfed server", "version": server_version()},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
    }


def build_docs_html() -> str:
    """A plain page listing each operation with its summary and models."""
    rows = []
    for op in OPS:
        models = ", ".join(m.__name__ for m in (op.body, op.response) if m is not None)
        rows.append(
            f"<tr><td><code>{op.method}</code></td><td><code>{html.escape(API + op.path)}</code></td>"
            f"<td>{html.escape(op.summary)}</td><td>{'yes' if op.auth else 'no'}</td>"
            f"<td>{html.escape(models)}</td></tr>"
        )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>vfed server API</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd}"
        "code{font-size:95%}</style></head><body><h1>vfed server API v1</h1>"
        f"<p>Machine-readable: <a href='{API}/openapi.json'>openapi.json</a>. Errors: "
        '<code>{"error", "detail"}</code>. Auth: <code>Authorization: Bearer &lt;token&gt;</code>.</p>'
        "<table><tr><th>method</th><th>path</th><th>what</th><th>auth</th><th>models</th></tr>"
        + "".join(rows)
        + "</table></body></html>"
    )
