"""The service's route table: every route, once (service/routes.py says how it is used).

The hot routes come first: the gateway tries the rules in this order.
"""

from __future__ import annotations

from bnserve.service import simple_api, v1, v2
from bnserve.service.drift import window_for
from bnserve.service.metrics import get_metrics, render
from bnserve.service.routes import (
    OPEN,
    PUBLIC_METRICS,
    Answer,
    Call,
    Doc,
    Route,
    is_open,
    json_answer,
)


def metrics_route(call: Call) -> Answer:
    """Prometheus text of every worker (multiprocess mode), the drift gauges brought up to date
    from the shared windows first."""
    metrics = get_metrics()
    for model in call.registry.models.values():
        runtime = model.loaded.get(model.default)
        window = window_for(runtime, call.config) if runtime is not None else None
        if window is not None:
            for entry in window.report()["inputs"]:
                metrics.drift_psi.labels(model.name, entry["name"]).set(entry["psi"])
    body, content_type = render()
    return 200, [("Content-Type", content_type), ("Content-Length", str(len(body)))], body


def openapi_route(call: Call) -> Answer:
    return json_answer(call.openapi)


GET, POST = ("GET",), ("POST",)
PREDICT = ("GET", "POST")
READ = (400, 404, 503)  # the errors of a model's read-only routes
CONTROL = (400, 403, 404, 504)  # the errors of load and unload

PREDICT_DOCS = {
    "GET": Doc("Explain the expected body", "Usage", "What POST expects, with an example", READ),
    "POST": Doc(
        "Predict class probabilities",
        "PredictResponse",
        "One prediction, or one per instance",
        (400, 404, 413, 503),
        request="PredictRequest",
    ),
}
INFER_DOC = Doc(
    "Inference (Open Inference Protocol)",
    "InferResponse",
    "Output tensors (JSON, or JSON header + binary tensors)",
    (400, 404, 413, 503),
    request="InferRequest",
    binary=True,
)
METADATA_DOC = Doc("Model metadata", "ModelMetadata", "Metadata", READ)
CONFIG_DOC = Doc(
    "Triton-style model configuration (tritonclient get_model_config)",
    "ModelConfig",
    "Configuration",
    READ,
)
READY_DOC = Doc("Model readiness", "ModelReady", "Ready", (404, 503))

ROUTES: tuple[Route, ...] = (
    Route("/predict", PREDICT, simple_api.predict_route, PREDICT_DOCS),
    Route("/v2/models/<name>/infer", POST, v2.infer_route, {"POST": INFER_DOC}),
    Route("/v2/models/<name>/versions/<version>/infer", POST, v2.infer_route, {"POST": INFER_DOC}),
    Route("/models/<name>/predict", PREDICT, simple_api.predict_route, PREDICT_DOCS),
    Route(
        "/models/<name>/versions/<version>/predict",
        PREDICT,
        simple_api.predict_route,
        PREDICT_DOCS,
    ),
    Route(
        "/models/<name>/drift",
        GET,
        simple_api.drift_route,
        {
            "GET": Doc(
                "Input drift: each input's PSI over the recent window against the training "
                "deciles, shifted inputs first",
                "Drift",
                "Drift report",
                (404, 503),
            )
        },
    ),
    Route(
        "/health",
        GET,
        simple_api.health_route,
        {
            "GET": Doc(
                "Whether every model is loaded (503 when not, or when draining)",
                "Health",
                "Every model is loaded",
                (503,),
            )
        },
        access=OPEN,
    ),
    Route(
        "/v2",
        GET,
        v2.server_metadata_route,
        {"GET": Doc("Server metadata", "ServerMetadata", "Metadata")},
    ),
    Route("/v2/health/live", GET, v2.live_route, {"GET": Doc("Liveness", "Live", "Live")}, OPEN),
    Route(
        "/v2/health/ready",
        GET,
        v2.ready_route,
        {"GET": Doc("Readiness", "Ready", "Ready", (503,))},
        OPEN,
    ),
    Route("/v2/models/<name>", GET, v2.model_metadata_route, {"GET": METADATA_DOC}),
    Route(
        "/v2/models/<name>/versions/<version>", GET, v2.model_metadata_route, {"GET": METADATA_DOC}
    ),
    Route("/v2/models/<name>/config", GET, v2.config_route, {"GET": CONFIG_DOC}),
    Route("/v2/models/<name>/versions/<version>/config", GET, v2.config_route, {"GET": CONFIG_DOC}),
    Route("/v2/models/<name>/ready", GET, v2.model_ready_route, {"GET": READY_DOC}),
    Route(
        "/v2/models/<name>/versions/<version>/ready",
        GET,
        v2.model_ready_route,
        {"GET": READY_DOC},
    ),
    Route(
        "/v1/models/<name>:predict",
        POST,
        v1.predict_route,
        {
            "POST": Doc(
                "KServe V1 predict: one class label per instance (or probabilities)",
                "V1Response",
                "Predictions",
                (400, 404, 413, 503),
                request="V1Request",
            )
        },
    ),
    Route(
        "/v1/models/<name>",
        GET,
        v1.model_route,
        {"GET": Doc("KServe V1 model status", "V1Model", "Ready", (404, 503))},
    ),
    Route(
        "/v2/repository/index",
        POST,
        v2.repository_index_route,
        {
            "POST": Doc(
                "Model repository index",
                "RepositoryIndex",
                "Every model version and its state",
            )
        },
    ),
    Route(
        "/v2/repository/models/<name>/load",
        POST,
        v2.load_route,
        {
            "POST": Doc(
                "Load or hot-reload a model (--model-control explicit): validate its files, "
                "compare its signature, switch every worker to it",
                "LoadResult",
                "Loaded (or unchanged)",
                CONTROL,
                request="ControlRequest",
                request_required=False,
            )
        },
    ),
    Route(
        "/v2/repository/models/<name>/unload",
        POST,
        v2.unload_route,
        {
            "POST": Doc(
                "Unload a model (--model-control explicit): every worker stops serving it",
                "LoadResult",
                "Unloaded (or already unloaded)",
                CONTROL,
                request="ControlRequest",
                request_required=False,
            )
        },
    ),
    Route(
        "/metrics",
        GET,
        metrics_route,
        {"GET": Doc("Prometheus metrics of every worker", "", "Prometheus text format")},
        PUBLIC_METRICS,
    ),
    Route(
        "/openapi.json",
        GET,
        openapi_route,
        {"GET": Doc("This document", "OpenAPI", "OpenAPI 3.1")},
    ),
)

#: The rules without parameters: their paths are bounded label values even before routing.
FIXED_PATHS = frozenset(route.rule for route in ROUTES if "<" not in route.rule)


def open_paths(public_metrics: bool) -> frozenset[str]:
    """The paths answered without a token (open routes have no parameters)."""
    return frozenset(route.rule for route in ROUTES if is_open(route, public_metrics))
