"""The OpenAPI 3 document of the control plane's HTTP API (``GET /api/v1/openapi.json``).

Its schemas are derived from ``proto/control.proto``'s message descriptors, so the HTTP
document and the gRPC API describe the same resources; the routes are listed here once.
"""

from __future__ import annotations

import functools
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from kloop.pb import control_pb2

_SCALARS = {
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer", "format": "int32"},
    FieldDescriptor.TYPE_INT64: {"type": "integer", "format": "int64"},
}

_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}


def _q(name: str, kind: str, help: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": {"type": kind},
            "description": help}


# (method, path, summary, path/query parameters, request message, response message, write?)
ROUTES: tuple[tuple[str, str, str, list[dict[str, Any]], str | None, str, bool], ...] = (
    ("get", "/runs", "List runs, newest first, paged", [
        _q("model", "string", "only this model's runs"),
        _q("status", "string", "running | succeeded | failed | interrupted | cancelled"),
        _q("created_after", "number", "unix seconds, inclusive"),
        _q("created_before", "number", "unix seconds, exclusive"),
        _q("order_by", "string", "'created desc' (default) or 'created asc'"),
        _q("page_size", "integer", "1..1000, default 50"),
        _q("page_token", "string", "next_page_token of the previous page")],
     None, "ListRunsResponse", False),
    ("post", "/runs", "Create a run of the train-and-promote pipeline", [], "CreateRunRequest",
     "Run", True),
    ("get", "/runs/{id}", "A run, with its steps and training progress", [_ID], None, "Run",
     False),
    ("get", "/runs/{id}/logs", "A run's log (kept after its processes are gone)", [
        _ID, _q("source", "string", "pipeline (default) | train"),
        _q("offset", "integer", "byte offset to read from"),
        _q("limit_bytes", "integer", "at most this many bytes (default 1 MiB)")],
     None, "RunLogs", False),
    ("get", "/runs/{id}/watch", "Server-Sent Events: run, log, progress, end", [
        _ID, _q("log_offset", "integer", "continue the log from this byte"),
        _q("progress_offset", "integer", "continue the progress from this byte")],
     None, "RunEvent", False),
    ("post", "/runs/{id}/cancel", "Cancel a running run (its rollout is aborted)", [_ID], None,
     "Run", True),
    ("post", "/runs/{id}/retry", "Continue a failed, cancelled or interrupted run from the step "
     "that did not finish", [_ID], None, "Run", True),
    ("get", "/rollouts", "List rollouts, newest first, paged", [
        _q("model", "string", "only this model's"), _q("active_only", "boolean", "only active"),
        _q("page_size", "integer", "1..1000, default 50"),
        _q("page_token", "string", "next_page_token of the previous page")],
     None, "ListRolloutsResponse", False),
    ("post", "/rollouts", "Roll a version out against its model's champion", [],
     "CreateRolloutRequest", "Rollout", True),
    ("get", "/rollouts/{id}", "A rollout: weights, steps, gate, history", [_ID], None,
     "Rollout", False),
    ("get", "/rollouts/{id}/watch", "Server-Sent Events: rollout, end", [_ID], None,
     "RolloutEvent", False),
    ("get", "/rollouts/{id}/series", "Weight, request rate, error rate and p99 per version "
     "over time", [_ID], None, "RolloutSeries", False),
    ("post", "/rollouts/{id}/promote", "Skip the remaining steps (the gate must have passed)",
     [_ID], "RolloutActionRequest", "Rollout", True),
    ("post", "/rollouts/{id}/abort", "Traffic back to the champion", [_ID],
     "RolloutActionRequest", "Rollout", True),
    ("post", "/rollouts/{id}/pause", "Hold at the current step (a failing analysis still rolls "
     "back)", [_ID], "RolloutActionRequest", "Rollout", True),
    ("post", "/rollouts/{id}/resume", "Continue a paused rollout", [_ID],
     "RolloutActionRequest", "Rollout", True),
    ("get", "/models", "Models with their versions, metrics, aliases and lineage", [], None,
     "ListModelsResponse", False),
    ("get", "/models/{name}", "One model", [_NAME], None, "Model", False),
    ("post", "/models/{name}/undo", "Back to an earlier version in one call (a former champion "
     "skips the gate and the steps)", [_NAME], "UndoRolloutRequest", "Rollout", True),
    ("get", "/compare", "Runs side by side: parameter diff, metrics, curves", [
        {"name": "ids", "in": "query", "required": True, "schema": {"type": "string"},
         "description": "comma-separated run ids (two or more)"}],
     None, "Comparison", False),
)


_PATH_FIELDS = {"RolloutActionRequest": ("id",), "UndoRolloutRequest": ("model",)}
_SUCCESS = {("post", "/runs"): "201", ("post", "/rollouts"): "201",
            ("post", "/models/{name}/undo"): "201", ("post", "/runs/{id}/cancel"): "202",
            ("post", "/runs/{id}/retry"): "202"}


def _field_schema(f: FieldDescriptor) -> dict[str, Any]:
    if f.message_type is not None and f.message_type.GetOptions().map_entry:
        value = f.message_type.fields_by_name["value"]
        return {"type": "object", "additionalProperties": _single(value)}
    one = _single(f)
    repeated = f.is_repeated
    return {"type": "array", "items": one} if repeated else one


def _single(f: FieldDescriptor) -> dict[str, Any]:
    if f.type == FieldDescriptor.TYPE_MESSAGE and f.message_type is not None:
        if f.message_type.full_name == "google.protobuf.Struct":
            return {"type": "object"}
        return {"$ref": f"#/components/schemas/{f.message_type.name}"}
    return dict(_SCALARS.get(f.type, {"type": "string"}))


def _schema(d: Descriptor) -> dict[str, Any]:
    return {"type": "object", "properties": {f.name: _field_schema(f) for f in d.fields}}


@functools.cache
def openapi() -> dict[str, Any]:
    schemas = {name: _schema(d) for name, d in control_pb2.DESCRIPTOR.message_types_by_name.items()}
    schemas["Error"] = {"type": "object", "properties": {"error": {"type": "string"},
                                                         "code": {"type": "integer"}}}
    # Over HTTP the path names the resource: the bodies leave those fields out.
    for name, path_fields in _PATH_FIELDS.items():
        body = dict(schemas[name]["properties"])
        for f in path_fields:
            body.pop(f)
        schemas[f"{name}Body"] = {"type": "object", "properties": body,
                                  "additionalProperties": False}
    paths: dict[str, dict[str, Any]] = {}
    for method, path, summary, params, request, answer, write in ROUTES:
        op: dict[str, Any] = {
            "summary": summary, "parameters": params,
            "responses": {
                "200": {"description": "OK", "content": {
                    "text/event-stream" if path.endswith("/watch") else "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{answer}"}}}},
                "400": {"$ref": "#/components/responses/BadRequest"},
                "404": {"$ref": "#/components/responses/NotFound"},
            },
        }
        ok = _SUCCESS.get((method, path), "200")
        if ok != "200":
            op["responses"][ok] = op["responses"].pop("200")
            op["responses"][ok]["description"] = {"201": "Created", "202": "Accepted"}[ok]
        if request is not None:
            schema = f"{request}Body" if request in _PATH_FIELDS else request
            op["requestBody"] = {"required": method == "post" and request != "RolloutActionRequest",
                                 "content": {"application/json": {
                                     "schema": {"$ref": f"#/components/schemas/{schema}"}}}}
        if write:
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = {"$ref": "#/components/responses/Unauthorized"}
            op["responses"]["409"] = {"$ref": "#/components/responses/Conflict"}
        paths.setdefault(f"/api/v1{path}", {})[method] = op

    def response(text: str) -> dict[str, Any]:
        return {"description": text, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/Error"}}}}

    return {
        "openapi": "3.0.3",
        "info": {"title": "kloop control plane", "version": "v1",
                 "description": "Pipeline runs, rollouts, models and experiments. The same "
                                "resources over gRPC: proto/control.proto (kloop.control.v1)."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "the token in <home>/control.token"}},
            "responses": {
                "BadRequest": response("bad input: a wrong type, an unknown field"),
                "Unauthorized": response("no token, or a wrong one"),
                "NotFound": response("no such resource"),
                "Conflict": response("the resource's state refuses the operation, or it "
                                     "moved since resource_version"),
            },
        },
    }
