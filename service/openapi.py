"""`GET /openapi.json`: an OpenAPI 3.1 description of every route this server answers.

The paths are written from the route table (service/api.py): each route's `Doc` per method names
its summary, its request and response schemas (declared here) and its error statuses, and its
access says whether a token is needed. Built once per worker from the served models (their names
are the path parameters' examples and the default model's feature count sizes the example body),
and checked in the tests with `openapi-spec-validator` and by schemathesis against the live server.
"""

from __future__ import annotations

import re
from typing import Any

import bnserve
from bnserve.service.api import ROUTES
from bnserve.service.config import ServiceConfig
from bnserve.service.registry import ModelRegistry
from bnserve.service.routes import Doc, Route, is_open

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
        "content": {JSON: {"schema": schema}},
    }


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Bad input: the message says what was expected",
        401: "Missing or invalid bearer token (WWW-Authenticate says how to authenticate)",
        403: "Model control is off (--model-control none): the message says how to enable it",
        404: "Unknown model, version or route",
        408: "The request body did not arrive within --body-timeout (the connection is closed)",
        413: "Body over the size limit, or more rows than the row limit",
        503: "The model is not loaded (or the server is draining)",
        504: "The reload is still running; its result is logged",
    }
    return {str(code): _json(_ref("Error"), text[code]) for code in codes}


def _schemas(n_features: int | None, raw_columns: bool = False) -> dict[str, Any]:
    number = {"type": "number"}
    # A model that reads raw table columns takes strings, booleans and null as well
    # (service/columns.py).
    cell = {"type": ["number", "string", "boolean", "null"]} if raw_columns else number
    row: dict[str, Any] = {
        "oneOf": [
            {"type": "array", "items": cell},
            {"type": "object", "additionalProperties": cell},
        ]
    }
    if n_features is not None:
        row["oneOf"][0] |= {"minItems": n_features, "maxItems": n_features}
    prediction = {
        "type": "object",
        "required": ["label", "class_index", "probabilities", "model", "version"],
        "properties": {
            "label": {"description": "the most probable class label (string or number)"},
            "class_index": {"type": "integer", "minimum": 0},
            "probabilities": {"type": "object", "additionalProperties": number},
            "model": {"type": "string"},
            "version": {"type": "string"},
        },
    }
    tensor_out = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "data": {"type": "array"},
            "parameters": {"type": "object"},
        },
    }
    tensor_in = {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": {"type": "string"},
            "data": {"type": "array"},
            "parameters": {"type": "object"},
        },
    }
    tensor_meta = {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    }
    return {
        "Error": {
            "type": "object",
            "required": ["error"],
            "properties": {"error": {"type": "string"}},
        },
        "PredictRequest": {
            "type": "object",
            "description": "either 'features' (one example) or 'instances' (several)",
            "properties": {
                "features": row,
                "instances": {"type": "array", "minItems": 1, "items": row},
                "top_k": {"type": "integer", "minimum": 1},
            },
        },
        "Prediction": prediction,
        "PredictResponse": {
            "oneOf": [
                prediction,
                {
                    "type": "object",
                    "required": ["predictions"],
                    "properties": {"predictions": {"type": "array", "items": prediction}},
                },
            ]
        },
        "Usage": {
            "type": "object",
            "required": ["usage", "model", "version", "n_features", "labels"],
            "properties": {
                "usage": {"type": "string"},
                "model": {"type": "string"},
                "version": {"type": "string"},
                "n_features": {"type": "integer"},
                "labels": {"type": "array"},
            },
        },
        "Health": {
            "type": "object",
            "required": ["status", "ready", "models"],
            "properties": {
                "status": {"type": "string"},
                "ready": {"type": "boolean"},
                "models": {"type": "object"},
            },
        },
        "ServerMetadata": {
            "type": "object",
            "required": ["name", "version", "extensions"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "extensions": {"type": "array", "items": {"type": "string"}},
            },
        },
        "Live": {
            "type": "object",
            "required": ["live"],
            "properties": {"live": {"type": "boolean"}},
        },
        "Ready": {
            "type": "object",
            "required": ["ready"],
            "properties": {"ready": {"type": "boolean"}},
        },
        "ModelMetadata": {
            "type": "object",
            "required": ["name", "versions", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": tensor_meta},
                "outputs": {"type": "array", "items": tensor_meta},
                "parameters": {"type": "object"},
            },
        },
        "ModelReady": {
            "type": "object",
            "required": ["name", "version", "ready"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "ready": {"type": "boolean"},
            },
        },
        "InferRequest": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "inputs": {"type": "array", "items": tensor_in},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string"},
                            "parameters": {"type": "object"},
                        },
                    },
                },
            },
        },
        "InferResponse": {
            "type": "object",
            "required": ["model_name", "outputs"],
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"description": "the request's id, echoed"},
                "outputs": {"type": "array", "items": tensor_out},
            },
        },
        "RepositoryIndex": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "version", "state"],
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "state": {"type": "string", "enum": ["READY", "UNAVAILABLE"]},
                    "reason": {"type": "string"},
                },
            },
        },
        "ControlRequest": {
            "type": "object",
            "properties": {
                "parameters": {
                    "type": "object",
                    "properties": {
                        "allow_signature_change": {"type": "boolean"},
                        "unload_dependents": {"type": "boolean"},
                    },
                    "additionalProperties": False,
                }
            },
        },
        "OpenAPI": {"type": "object"},
        "ModelConfig": {
            "type": "object",
            "required": ["name", "platform", "max_batch_size", "input", "output"],
            "properties": {
                "name": {"type": "string"},
                "platform": {"type": "string"},
                "backend": {"type": "string"},
                "max_batch_size": {"type": "integer"},
                "input": {"type": "array", "items": {"type": "object"}},
                "output": {"type": "array", "items": {"type": "object"}},
                "version_policy": {"type": "object"},
                "parameters": {"type": "object"},
            },
        },
        "V1Request": {
            "type": "object",
            "required": ["instances"],
            "properties": {
                "instances": {"type": "array", "minItems": 1, "items": row},
                "parameters": {
                    "type": "object",
                    "properties": {"probabilities": {"type": "boolean"}},
                },
            },
            "additionalProperties": False,
        },
        "V1Response": {
            "type": "object",
            "required": ["predictions"],
            "properties": {"predictions": {"type": "array"}},
        },
        "Drift": {
            "type": "object",
            "required": ["model", "version", "window_seconds", "rows", "inputs"],
            "properties": {
                "model": {"type": "string"},
                "version": {"type": "string"},
                "window_seconds": {"type": "number"},
                "rows": {"type": "integer"},
                "threshold": {"type": "number"},
                "inputs": {"type": "array", "items": {"type": "object"}},
            },
        },
        "V1Model": {
            "type": "object",
            "required": ["name", "ready"],
            "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
        },
        "LoadResult": {
            "type": "object",
            "required": ["name", "result", "versions"],
            "properties": {
                "name": {"type": "string"},
                "result": {"type": "string", "enum": ["ok", "unchanged", "unloaded"]},
                "versions": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
    }


_HEADER_LENGTH = {
    "name": "Inference-Header-Content-Length",
    "in": "header",
    "required": False,
    "description": "binary tensor data extension: the size of the JSON part of the body",
    "schema": {"type": "integer", "minimum": 0},
}
_REQUEST_ID = {"$ref": "#/components/parameters/RequestId"}
_RULE_PARAMETER = re.compile(r"<([a-z_]+)>")


def _path_parameters(names: list[str]) -> dict[str, dict[str, Any]]:
    """The path parameters a rule may hold, with the served models' names as examples."""
    return {
        "name": {
            "name": "name",
            "in": "path",
            "required": True,
            "description": "model name",
            "schema": {"type": "string", "minLength": 1},
            "examples": {n: {"value": n} for n in names},
        },
        "version": {
            "name": "version",
            "in": "path",
            "required": True,
            "description": "model version (a positive integer)",
            "schema": {"type": "string", "minLength": 1},
            "examples": {"one": {"value": "1"}},
        },
    }


def _ok(doc: Doc) -> dict[str, Any]:
    if not doc.response:
        return {
            "description": doc.answered,
            "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
            "content": {"text/plain": {"schema": {"type": "string"}}},
        }
    answer = _json(_ref(doc.response), doc.answered)
    if doc.binary:
        answer["content"]["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary"}
        }
    return answer


def _operation(
    route: Route, doc: Doc, path_parameters: dict[str, Any], auth: bool, public_metrics: bool
) -> dict[str, Any]:
    """The OpenAPI operation object of one method of `route`."""
    public = is_open(route, public_metrics)
    parameters = [path_parameters[n] for n in _RULE_PARAMETER.findall(route.rule)]
    if doc.binary:
        parameters.append(_HEADER_LENGTH)
    guarded = (401,) if auth and not public else ()
    operation: dict[str, Any] = {
        "summary": doc.summary,
        "parameters": [*parameters, _REQUEST_ID],
        "responses": {"200": _ok(doc), **_errors(*doc.errors, *guarded)},
    }
    if doc.request:
        operation["requestBody"] = {
            "required": doc.request_required,
            "content": {JSON: {"schema": _ref(doc.request)}},
        }
    if public and auth:
        operation["security"] = []
    return operation


def openapi_document(registry: ModelRegistry, config: ServiceConfig) -> dict[str, Any]:
    """The OpenAPI 3.1 document for this server's routes (every route of the table) and models."""
    default = registry.models.get(registry.default_model or "")
    runtime = default.loaded.get(default.default) if default is not None else None
    n_features = runtime.info.n_features if runtime is not None else None
    raw_columns = any(
        r.info.columns is not None for m in registry.models.values() for r in m.loaded.values()
    )
    auth = bool(config.token_file)
    path_parameters = _path_parameters(list(registry.models))
    paths: dict[str, Any] = {}
    for route in ROUTES:
        path = _RULE_PARAMETER.sub(r"{\1}", route.rule)
        paths[path] = {
            method.lower(): _operation(
                route, route.docs[method], path_parameters, auth, config.public_metrics
            )
            for method in route.methods
        }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "bnserve",
            "version": bnserve.__version__,
            "description": "Softmax predictions from ONNX classifiers: a simple JSON API and the "
            "Open Inference Protocol (KServe V2) over HTTP/REST.",
        },
        "paths": paths,
        "components": {
            "schemas": _schemas(n_features, raw_columns),
            "parameters": {
                "RequestId": {
                    "name": "X-Request-ID",
                    "in": "header",
                    "required": False,
                    "description": "echoed in the response; generated when absent or not a "
                    "token of 1-128 characters from [A-Za-z0-9._:/+=@-]",
                    "schema": {"type": "string"},
                }
            },
            "headers": {
                "RequestId": {
                    "description": "the request's id (the client's, or generated)",
                    "schema": {"type": "string"},
                }
            },
        },
    }
    if auth:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
