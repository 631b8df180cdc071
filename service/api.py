"""The service's route table: every route, once (service/routes.py says how it is used).

The hot routes come first: the gateway tries the rules in this order.
"""

from __future__ import annotations

from bnserve.service import simple_api, v2
from bnserve.service.metrics import render
from bnserve.service.routes import Answer, Call, Route, json_answer


def metrics_route(call: Call) -> Answer:
    """Prometheus text of every worker (multiprocess mode)."""
    body, content_type = render()
    return 200, [("Content-Type", content_type), ("Content-Length", str(len(body)))], body


def openapi_route(call: Call) -> Answer:
    return json_answer(call.openapi)


GET, POST = ("GET",), ("POST",)
PREDICT = ("GET", "POST")

ROUTES: tuple[Route, ...] = (
    Route("/predict", PREDICT, simple_api.predict_route),
    Route("/v2/models/<name>/infer", POST, v2.infer_route),
    Route("/v2/models/<name>/versions/<version>/infer", POST, v2.infer_route),
    Route("/models/<name>/predict", PREDICT, simple_api.predict_route),
    Route("/models/<name>/versions/<version>/predict", PREDICT, simple_api.predict_route),
    Route("/health", GET, simple_api.health_route),
    Route("/v2", GET, v2.server_metadata_route),
    Route("/v2/health/live", GET, v2.live_route),
    Route("/v2/health/ready", GET, v2.ready_route),
    Route("/v2/models/<name>", GET, v2.model_metadata_route),
    Route("/v2/models/<name>/versions/<version>", GET, v2.model_metadata_route),
    Route("/v2/models/<name>/ready", GET, v2.model_ready_route),
    Route("/v2/models/<name>/versions/<version>/ready", GET, v2.model_ready_route),
    Route("/v2/repository/index", POST, v2.repository_index_route),
    Route("/v2/repository/models/<name>/load", POST, v2.load_route),
    Route("/v2/repository/models/<name>/unload", POST, v2.unload_route),
    Route("/metrics", GET, metrics_route),
    Route("/openapi.json", GET, openapi_route),
)
