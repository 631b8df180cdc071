"""The Flask application factory: configuration, models, the gateway. No module-level app.

gunicorn calls `create_app` in each worker after the fork (the app is never preloaded in the
master), so the onnxruntime sessions it creates belong to that worker alone. The returned Flask
app has the gateway (service/gateway.py) installed as its `wsgi_app`: it answers every route of
the table in service/api.py, with request ids, auth, metrics, access log and the reload watch.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from flask import Flask
from werkzeug.routing import Rule

from bnserve.service import tracing
from bnserve.service.api import ROUTES, open_paths
from bnserve.service.auth import BearerAuth, read_tokens
from bnserve.service.config import ServiceConfig
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
    """Build the app for `config`; loads and warms up every model unless `registry` is given.

    The gateway answers every request from the route table (service/api.py); Flask's URL map
    holds the same rules, so Flask's tools (and the OpenAPI test) see exactly what is served."""
    if not isinstance(config, ServiceConfig):
        config = ServiceConfig.from_mapping(config)
    store = None
    if registry is None:
        registry, store = build_registry(config)
    metrics = get_metrics()
    registry.attach_metrics(metrics)
    if tracing.ACTIVE is None:
        tracing.ACTIVE = tracing.tracer_from_env()
    app = Flask("bnserve")
    app.extensions["bnserve.config"] = config
    app.extensions["bnserve.registry"] = registry
    app.extensions["bnserve.store"] = store
    for route in ROUTES:
        app.url_map.add(Rule(route.rule, methods=route.methods, endpoint=route.handler.__name__))
    tokens = load_tokens(config, store)
    access = config.access_log and config.log_level in ("debug", "info")
    app.wsgi_app = Gateway(  # type: ignore[method-assign]
        config,
        registry,
        metrics=metrics,
        access_log=AccessLog() if access else None,
        auth=BearerAuth(tokens, open_paths(config.public_metrics)) if tokens is not None else None,
        store=store,
        openapi=orjson.dumps(openapi_document(registry, config)),
        tracer=tracing.ACTIVE,
    )
    return app
