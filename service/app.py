"""The Flask application factory: configuration, models, routes, errors. No module-level app.

gunicorn calls `create_app` in each worker after the fork (the app is never preloaded in the
master), so the onnxruntime sessions it creates belong to that worker alone.
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from service import simple_api, v2
from service.config import ServiceConfig
from service.errors import install_error_handlers
from service.registry import ModelRegistry
from service.repository import find_models

log = logging.getLogger("bnserve.service")


def create_app(
    config: ServiceConfig | dict[str, Any], registry: ModelRegistry | None = None
) -> Flask:
    """Build the app for `config`; loads and warms up every model unless `registry` is given."""
    if not isinstance(config, ServiceConfig):
        config = ServiceConfig.from_mapping(config)
    if registry is None:
        registry = ModelRegistry(find_models(config.model, config.model_name), config.model_name)
        registry.load_all(config.device, config.intra_op_threads, config.output_kind)
    app = Flask("bnserve")
    app.json.sort_keys = False
    app.extensions["bnserve.config"] = config
    app.extensions["bnserve.registry"] = registry
    install_error_handlers(app)
    app.register_blueprint(simple_api.create_blueprint())
    app.register_blueprint(v2.create_blueprint())
    return app
