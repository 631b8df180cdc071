"""The simple JSON API: `POST /predict` with features, `GET /predict` explains, `GET /health`.

Parsing and validation are plain functions over the parsed body and the model's interface, so
their messages can be tested without a server; the routes only read the body and encode.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnserve.service.body import JsonBudget, dumps, json_type, parse_json_object, read_body
from bnserve.service.columns import RawColumn, feeds_from_rows
from bnserve.service.config import ServiceConfig
from bnserve.service.drift import window_for
from bnserve.service.errors import BadRequestError, NotFoundError, PayloadTooLargeError
from bnserve.service.registry import ModelRegistry
from bnserve.service.routes import Answer, Call, json_answer
from bnserve.service.runtime import ModelRuntime

EXAMPLE = '{"features": [f1, ..., fF]} or {"instances": [[...], ...]}'
_NUMBER_TYPES = (int, float)


def features_row(features: Any, runtime: ModelRuntime, where: str = "features") -> list[float]:
    """One example as a list of F numbers, from a list in order or an object of feature names."""
    n_features = runtime.info.n_features
    if isinstance(features, dict):
        return _row_from_names(features, runtime, where)
    if not isinstance(features, list):
        raise BadRequestError(
            f"'{where}' must be an array of {n_features} numbers or an object of feature names, "
            f"got a JSON {json_type(features)}"
        )
    for i, value in enumerate(features):
        if type(value) not in _NUMBER_TYPES:
            raise BadRequestError(_not_a_number(f"{where}[{i}]", value, n_features))
    if len(features) != n_features:
        raise BadRequestError(f"{where}: expected {n_features} features, got {len(features)}")
    return features


def _row_from_names(features: dict[str, Any], runtime: ModelRuntime, where: str) -> list[float]:
    names = runtime.info.feature_names
    n_features = runtime.info.n_features
    if names is None:
        raise BadRequestError(
            f"{where}: this model has no feature names; send an array of {n_features} numbers"
        )
    index = runtime.feature_index
    unknown = [k for k in features if k not in index]
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise BadRequestError(
            f"{where}: unknown feature names {shown} (expected names like {names[0]!r}; "
            "GET /predict lists them)"
        )
    if len(features) != n_features:
        missing = [n for n in names if n not in features]
        shown = ", ".join(repr(n) for n in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise BadRequestError(
            f"{where}: expected {n_features} features, got {len(features)}; missing {shown}"
        )
    row = [0.0] * n_features
    for name, value in features.items():
        if type(value) not in _NUMBER_TYPES:
            raise BadRequestError(_not_a_number(f"{where}[{name!r}]", value, n_features))
        row[index[name]] = value
    return row


def _not_a_number(where: str, value: Any, n_features: int) -> str:
    kind = json_type(value)
    if kind == "array":
        return f"{where} is a nested array: send a flat array of {n_features} numbers"
    return f"{where} must be a number, got a JSON {kind} ({value!r})"


def to_array(rows: list[list[float]], runtime: ModelRuntime) -> np.ndarray:
    """`[n, F]` in the model's input dtype; values that overflow it (1e39 in float32) are refused."""
    with np.errstate(over="ignore"):
        x = np.array(rows, dtype=runtime.info.input.dtype)
    if not np.isfinite(x).all():
        raise BadRequestError(
            f"feature values must be finite numbers within {x.dtype} range "
            f"(row {int(np.argwhere(~np.isfinite(x))[0][0])})"
        )
    return x


def parse_predict_request(
    body: dict[str, Any], runtime: ModelRuntime, max_batch: int
) -> tuple[np.ndarray | dict[str, np.ndarray], bool, int | None]:
    """(x `[n, F]`, or one array per raw column, whether the request was `instances`, top_k)
    from a parsed body."""
    has_features, has_instances = "features" in body, "instances" in body
    if has_features == has_instances:
        raise BadRequestError(
            f"expected a JSON object with either 'features' or 'instances', like {EXAMPLE}"
        )
    top_k = _top_k(body.get("top_k"), runtime.n_classes)
    columns = runtime.info.columns
    if has_features:
        if columns is not None:
            return feeds_from_rows([body["features"]], columns, "features"), False, top_k
        return to_array([features_row(body["features"], runtime)], runtime), False, top_k
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise BadRequestError(
            f"'instances' must be a non-empty array of examples, got a JSON {json_type(instances)}"
        )
    if len(instances) > max_batch:
        raise PayloadTooLargeError(
            f"too many rows: {len(instances)} instances, at most {max_batch} per request"
        )
    if columns is not None:
        return feeds_from_rows(instances, columns, "instances"), True, top_k
    rows = [features_row(row, runtime, f"instances[{i}]") for i, row in enumerate(instances)]
    return to_array(rows, runtime), True, top_k


def _top_k(value: Any, n_classes: int) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 1 <= value <= n_classes:
        raise BadRequestError(f"top_k must be an integer from 1 to {n_classes}, got {value!r}")
    return value


def predictions(runtime: ModelRuntime, probabilities: np.ndarray, top_k: int | None) -> list[dict]:
    """One answer object per row: best label, its index, and the class probabilities."""
    labels = runtime.labels
    keys = runtime.label_keys
    version = str(runtime.version)
    answers = []
    for row in probabilities:
        # numpy float32 scalars: orjson writes their shortest float32 form ("0.9999999").
        if top_k is None:
            best = int(np.argmax(row))
            probs = dict(zip(keys, row, strict=True))
        else:
            order = np.argsort(-row, kind="stable")[:top_k].tolist()
            best = order[0]
            probs = {keys[j]: row[j] for j in order}
        answers.append(
            {
                "label": labels[best],
                "class_index": best,
                "probabilities": probs,
                "model": runtime.name,
                "version": version,
            }
        )
    return answers


def explain(registry: ModelRegistry, runtime: ModelRuntime, max_batch: int) -> dict[str, Any]:
    """What `POST /predict` expects, with an example body for this model."""
    info = runtime.info
    example_features: Any = (
        {name: 0.0 for name in info.feature_names[:3]} if info.feature_names else [0.0] * 3
    )
    extra: dict[str, Any] = {}
    if info.columns is not None:
        example_features = {c.name: _example(c) for c in info.columns}
        extra["columns"] = [c.describe() for c in info.columns]
    return {
        "usage": (
            f"POST a JSON object {EXAMPLE} with {info.n_features} features per example "
            '(an array in order, or an object by feature name); optional "top_k": k keeps '
            f"the k most probable classes; at most {max_batch} instances per request"
        ),
        "model": runtime.name,
        "version": str(runtime.version),
        "n_features": info.n_features,
        "feature_names": list(info.feature_names) if info.feature_names else None,
        "labels": list(runtime.labels),
        "max_batch": max_batch,
        "example_partial": {"features": example_features},
        "models": {name: m.version_names() for name, m in registry.models.items()},
        **extra,
    }


def _example(column: RawColumn) -> Any:
    if column.kind == "categorical":
        return column.categories[0] if column.categories else None
    return False if column.kind == "boolean" else 0.0


def predict_body(
    registry: ModelRegistry,
    name: str | None,
    version: str | None,
    environ: dict[str, Any],
    config: ServiceConfig,
) -> bytes:
    """The whole `POST /predict`: read and parse the body, run, encode (raises BnserveError).

    Shared by the Flask route and the gateway's fast path (service/gateway.py).
    """
    runtime = registry.get(name, version)
    budget = JsonBudget.for_rows(config.max_batch, runtime.info.n_features)
    body = parse_json_object(read_body(environ, config.max_body_bytes), EXAMPLE, budget)
    x, batched, top_k = parse_predict_request(body, runtime, config.max_batch)
    warnings = runtime.check_inputs(x, config.on_out_of_range, config.out_of_range_k)
    drift = window_for(runtime, config)
    if drift is not None:
        drift.observe(x)
    answers = predictions(runtime, runtime.probabilities(x), top_k)
    for warning in warnings:  # on the answer of the row it is about, only where there is one
        answers[warning.pop("row")].setdefault("warnings", []).append(warning)
    return dumps({"predictions": answers} if batched else answers[0])


def predict_route(call: Call) -> Answer:
    """`/predict`, `/models/{m}/predict`, `/models/{m}/versions/{v}/predict`: POST predicts,
    GET (and HEAD) explains the body this model expects."""
    name, version = call.params.get("name"), call.params.get("version")
    registry, config = call.registry, call.config
    runtime = registry.get(name, version)
    if call.method != "POST":
        return json_answer(dumps(explain(registry, runtime, config.max_batch)))
    return json_answer(predict_body(registry, name, version, call.environ, config))


def drift_route(call: Call) -> Answer:
    """`GET /models/{m}/drift`: each input's PSI over the recent window, shifted inputs first."""
    name = call.params["name"]
    runtime = call.registry.get(name, None)
    window = window_for(runtime, call.config)
    if window is None:
        raise NotFoundError(
            f"model {name!r} has no training profile with deciles (convert it with this bnserve)"
        )
    return json_answer(dumps({"model": name, "version": str(runtime.version), **window.report()}))


def health_route(call: Call) -> Answer:
    """`GET /health`: 200 when every model is loaded and the server is not draining, else 503."""
    registry = call.registry
    ready = registry.ready_to_serve
    return json_answer(dumps(health_document(registry)), 200 if ready else 503)


def health_document(registry: ModelRegistry) -> dict[str, Any]:
    """Whether every model is loaded, and where each runs."""
    models = {}
    for name, model in registry.models.items():
        loaded = model.loaded.get(model.default)
        models[name] = {
            "ready": model.ready,
            "versions": model.version_names(),
            "default_version": str(model.default),
            "device": loaded.device if loaded else None,
            "errors": {str(v): e for v, e in model.errors.items()} or None,
        }
    ready = registry.ready_to_serve
    return {
        "status": "draining" if registry.draining else ("ok" if ready else "not ready"),
        "ready": ready,
        "models": models,
    }
