"""KServe's V1 protocol (the TensorFlow-Serving-like JSON API many KServe users still call):
`GET /v1/models/{m}` says whether the model is ready, `POST /v1/models/{m}:predict` takes
`{"instances": [...]}` (rows as in the simple API: arrays in feature order, or objects by
feature or column name) and answers `{"predictions": [...]}`, one class label per instance, as
KServe's scikit-learn server answers `predict`. Add `"parameters": {"probabilities": true}` for
each instance's class probabilities instead. Errors have the service's one JSON shape.
"""

from __future__ import annotations

from typing import Any

from bnserve.service.body import JsonBudget, dumps, parse_json_object, read_body
from bnserve.service.errors import BadRequestError
from bnserve.service.routes import Answer, Call, json_answer
from bnserve.service.simple_api import parse_predict_request
from bnserve.service.v2_tensors import check_parameters

EXAMPLE = '{"instances": [[5.1, 3.5, 1.4, 0.2]]}'


def model_route(call: Call) -> Answer:
    """`GET /v1/models/{m}`: 200 with `ready` true when loaded (404 unknown, 503 not loaded)."""
    name = call.params["name"]
    call.registry.get(name, None)
    return json_answer(dumps({"name": name, "ready": True}))


def predict_route(call: Call) -> Answer:
    """`POST /v1/models/{m}:predict`."""
    runtime = call.registry.get(call.params["name"], None)
    config = call.config
    budget = JsonBudget.for_rows(config.max_batch, runtime.info.n_features)
    body = parse_json_object(read_body(call.environ, config.max_body_bytes), EXAMPLE, budget)
    if "instances" not in body:
        raise BadRequestError(f"expected a JSON object with 'instances', like {EXAMPLE}")
    parameters = check_parameters(body.get("parameters"), "'parameters'")
    probabilities = parameters.get("probabilities", False)
    if type(probabilities) is not bool:
        raise BadRequestError("parameter 'probabilities' must be true or false")
    unknown = [k for k in body if k not in ("instances", "parameters")]
    if unknown:
        raise BadRequestError(f"unknown fields {unknown}; V1 takes 'instances' (and 'parameters')")
    x, _, _ = parse_predict_request({"instances": body["instances"]}, runtime, config.max_batch)
    scores = runtime.probabilities(x)
    predictions: list[Any]
    if probabilities:
        predictions = scores.tolist()
    else:
        labels = runtime.labels
        predictions = [labels[i] for i in scores.argmax(axis=1).tolist()]
    return json_answer(dumps({"predictions": predictions}))
