"""`GET /openapi.json`: an OpenAPI 3.1 description of every route this server answers.

Built once per worker from the served models (their names are the path parameters' examples and
the default model's feature count sizes the example body), and checked in the tests with
`openapi-spec-validator` and by schemathesis against the live server.
"""

from __future__ import annotations

from typing import Any

import bnserve
from bnserve.service.config import ServiceConfig
from bnserve.service.registry import ModelRegistry

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


def _schemas(n_features: int | None) -> dict[str, Any]:
    number = {"type": "number"}
    row: dict[str, Any] = {
        "oneOf": [
            {"type": "array", "items": number},
            {"type": "object", "additionalProperties": number},
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


def openapi_document(registry: ModelRegistry, config: ServiceConfig) -> dict[str, Any]:
    """The OpenAPI 3.1 document for this server's routes and models."""
    names = list(registry.models)
    default = registry.models.get(registry.default_model or "")
    runtime = default.loaded.get(default.default) if default is not None else None
    n_features = runtime.info.n_features if runtime is not None else None
    auth = bool(config.token_file)
    guarded = (401,) if auth else ()

    name = {
        "name": "name",
        "in": "path",
        "required": True,
        "description": "model name",
        "schema": {"type": "string", "minLength": 1},
        "examples": {n: {"value": n} for n in names},
    }
    version = {
        "name": "version",
        "in": "path",
        "required": True,
        "description": "model version (a positive integer)",
        "schema": {"type": "string", "minLength": 1},
        "examples": {"one": {"value": "1"}},
    }
    request_id = {"$ref": "#/components/parameters/RequestId"}
    header_length = {
        "name": "Inference-Header-Content-Length",
        "in": "header",
        "required": False,
        "description": "binary tensor data extension: the size of the JSON part of the body",
        "schema": {"type": "integer", "minimum": 0},
    }

    def op(
        summary: str,
        ok: dict[str, Any],
        errors: tuple[int, ...],
        params: tuple = (),
        body: dict[str, Any] | None = None,
        open_route: bool = False,
    ) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "summary": summary,
            "parameters": [*params, request_id],
            "responses": {"200": ok, **_errors(*errors, *(() if open_route else guarded))},
        }
        if body is not None:
            operation["requestBody"] = body
        if open_route and auth:
            operation["security"] = []
        return operation

    predict_body = {
        "required": True,
        "content": {JSON: {"schema": _ref("PredictRequest")}},
    }
    control_body = {
        "required": False,
        "content": {
            JSON: {
                "schema": {
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
                }
            }
        },
    }
    infer_body = {"required": True, "content": {JSON: {"schema": _ref("InferRequest")}}}
    infer_ok = {
        "description": "Output tensors (JSON, or JSON header + binary tensors)",
        "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
        "content": {
            JSON: {"schema": _ref("InferResponse")},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
    usage = _json(_ref("Usage"), "What POST expects, with an example")
    predicted = _json(_ref("PredictResponse"), "One prediction, or one per instance")

    def predict_pair(params: tuple) -> dict[str, Any]:
        return {
            "get": op("Explain the expected body", usage, (400, 404, 503), params),
            "post": op(
                "Predict class probabilities",
                predicted,
                (400, 404, 413, 503),
                params,
                predict_body,
            ),
        }

    paths: dict[str, Any] = {
        "/predict": predict_pair(()),
        "/models/{name}/predict": predict_pair((name,)),
        "/models/{name}/versions/{version}/predict": predict_pair((name, version)),
        "/health": {
            "get": op(
                "Whether every model is loaded (503 when not, or when draining)",
                _json(_ref("Health"), "Every model is loaded"),
                (503,),
                open_route=True,
            )
        },
        "/v2": {"get": op("Server metadata", _json(_ref("ServerMetadata"), "Metadata"), ())},
        "/v2/health/live": {
            "get": op("Liveness", _json(_ref("Live"), "Live"), (), open_route=True)
        },
        "/v2/health/ready": {
            "get": op("Readiness", _json(_ref("Ready"), "Ready"), (503,), open_route=True)
        },
        "/v2/models/{name}": {
            "get": op(
                "Model metadata", _json(_ref("ModelMetadata"), "Metadata"), (400, 404, 503), (name,)
            )
        },
        "/v2/models/{name}/versions/{version}": {
            "get": op(
                "Model version metadata",
                _json(_ref("ModelMetadata"), "Metadata"),
                (400, 404, 503),
                (name, version),
            )
        },
        "/v2/models/{name}/ready": {
            "get": op("Model readiness", _json(_ref("ModelReady"), "Ready"), (404, 503), (name,))
        },
        "/v2/models/{name}/versions/{version}/ready": {
            "get": op(
                "Model version readiness",
                _json(_ref("ModelReady"), "Ready"),
                (404, 503),
                (name, version),
            )
        },
        "/v2/models/{name}/infer": {
            "post": op(
                "Inference (Open Inference Protocol)",
                infer_ok,
                (400, 404, 413, 503),
                (name, header_length),
                infer_body,
            )
        },
        "/v2/models/{name}/versions/{version}/infer": {
            "post": op(
                "Inference on a version",
                infer_ok,
                (400, 404, 413, 503),
                (name, version, header_length),
                infer_body,
            )
        },
        "/v2/repository/index": {
            "post": op(
                "Model repository index",
                _json(_ref("RepositoryIndex"), "Every model version and its state"),
                (),
            )
        },
        "/v2/repository/models/{name}/load": {
            "post": op(
                "Load or hot-reload a model (--model-control explicit): validate its files, "
                "compare its signature, switch every worker to it",
                _json(_ref("LoadResult"), "Loaded (or unchanged)"),
                (400, 403, 404, 504),
                (name,),
                control_body,
            )
        },
        "/v2/repository/models/{name}/unload": {
            "post": op(
                "Unload a model (--model-control explicit): every worker stops serving it",
                _json(_ref("LoadResult"), "Unloaded (or already unloaded)"),
                (400, 403, 404, 504),
                (name,),
                control_body,
            )
        },
        "/metrics": {
            "get": op(
                "Prometheus metrics of every worker",
                {
                    "description": "Prometheus text format",
                    "headers": {"X-Request-ID": {"$ref": "#/components/headers/RequestId"}},
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                },
                (),
                open_route=config.public_metrics,
            )
        },
        "/openapi.json": {
            "get": op(
                "This document",
                _json({"type": "object"}, "OpenAPI 3.1"),
                (),
            )
        },
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
            "schemas": _schemas(n_features),
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
