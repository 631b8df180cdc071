"""The Flask application factory: configuration, models, routes, errors. No module-level app.

gunicorn calls `create_app` in each worker after the fork (the app is never preloaded in the
master), so the onnxruntime sessions it creates belong to that worker alone. The returned Flask
app has the gateway (service/gateway.py) installed as its `wsgi_app`: request ids, auth, metrics,
access log, hot-reload watch and the `POST /predict` fast path sit in front of the routes.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from bnserve.errors import BnserveError
from bnserve.service import simple_api, v2
from bnserve.service.auth import BearerAuth, read_tokens
from bnserve.service.config import ServiceConfig
from bnserve.service.errors import error_body
from bnserve.service.gateway import AccessLog, Gateway
from bnserve.service.metrics import get_metrics
from bnserve.service.openapi import openapi_document
from bnserve.service.registry import ModelRegistry
from bnserve.service.reload import ModelStore
from bnserve.service.repository import find_models

log = logging.getLogger("bnserve.service")


def build_registry(config: ServiceConfig) -> tuple[ModelRegistry, ModelStore | None]:
    """Load every model: from the store's copies when `bnserve serve` set one up, else the files."""
    if config.runtime_dir:
        store = ModelStore(config.runtime_dir)
        registry = ModelRegistry({}, config.model_name)
        registry.metrics = get_metrics()
        registry.apply_state(
            store.read(), config.device, config.intra_op_threads, config.output_kind
        )
        return registry, store
    registry = ModelRegistry(find_models(config.model, config.model_name), config.model_name)
    registry.metrics = get_metrics()
    registry.load_all(config.device, config.intra_op_threads, config.output_kind)
    return registry, None


def load_tokens(config: ServiceConfig, store: ModelStore | None) -> tuple[bytes, ...] | None:
    """The accepted tokens: the store's validated copy (every worker reads the same one), else
    the token file. A copy that cannot be read accepts no token at all: never an open server."""
    if not config.token_file:
        return None
    if store is None:
        return read_tokens(config.token_file)
    try:
        return store.read_tokens()
    except OSError as exc:
        log.error("cannot read the token copy %s, refusing every token: %s", store.tokens_path, exc)
        return ()


def create_app(
    config: ServiceConfig | dict[str, Any], registry: ModelRegistry | None = None
) -> Flask:
    """Build the app for `config`; loads and warms up every model unless `registry` is given."""
    if not isinstance(config, ServiceConfig):
        config = ServiceConfig.from_mapping(config)
    store = None
    if registry is None:
        registry, store = build_registry(config)
    metrics = get_metrics()
    registry.attach_metrics(metrics)
    app = Flask("bnserve")
    app.json.sort_keys = False
    app.extensions["bnserve.config"] = config
    app.extensions["bnserve.registry"] = registry
    app.extensions["bnserve.store"] = store
    install_error_handlers(app)
    app.register_blueprint(simple_api.create_blueprint())
    app.register_blueprint(v2.create_blueprint())

    @app.before_request
    def _route_label() -> None:
        rule = request.url_rule  # None for 404: the gateway labels those "unmatched"
        request.environ["bnserve.route"] = rule.rule if rule is not None else None

    tokens = load_tokens(config, store)
    access = config.access_log and config.log_level in ("debug", "info")
    app.wsgi_app = Gateway(  # type: ignore[method-assign]
        app.wsgi_app,
        config,
        registry,
        metrics=metrics,
        access_log=AccessLog() if access else None,
        auth=BearerAuth(tokens, config.public_metrics) if tokens is not None else None,
        store=store,
        openapi=orjson.dumps(openapi_document(registry, config)),
    )
    return app


def json_error(status: int, message: str) -> Response:
    return Response(error_body(message), status=status, mimetype="application/json")


def install_error_handlers(app: Flask) -> None:
    """Map every exception a Flask route can raise to a JSON error with the right status:
    `BnserveError` subclasses by their status, werkzeug's 404/405, anything else a logged 500."""

    @app.errorhandler(BnserveError)
    def _bnserve_error(exc: BnserveError) -> Response:
        status = exc.http_status
        if status >= 500 and status != 503:
            log.error("%s %s failed: %s", request.method, request.path, exc)
        return json_error(status, str(exc))

    @app.errorhandler(NotFound)
    def _not_found(exc: NotFound) -> Response:
        return json_error(404, f"no route {request.method} {request.path}")

    @app.errorhandler(MethodNotAllowed)
    def _method_not_allowed(exc: MethodNotAllowed) -> Response:
        allowed = ", ".join(sorted(m for m in exc.valid_methods or () if m != "OPTIONS"))
        response = json_error(
            405, f"method {request.method} is not allowed for {request.path} (allowed: {allowed})"
        )
        if exc.valid_methods:
            response.headers["Allow"] = ", ".join(exc.valid_methods)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        return json_error(exc.code or 500, exc.description or exc.name)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        # A bug, not a bad request: log the traceback, answer JSON, keep the worker serving.
        log.exception("unhandled error in %s %s", request.method, request.path)
        return json_error(500, f"internal error: {type(exc).__name__}")
