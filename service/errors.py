"""One place that turns exceptions into JSON error responses.

Handlers raise `BnserveError` subclasses (each carries its HTTP status); werkzeug's own errors
(404 unknown route, 405 wrong method) and anything unexpected are mapped here too, so a client
never sees an HTML page or a traceback, only `{"error": "..."}`.
"""

from __future__ import annotations

import logging

import orjson
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from bnserve.errors import BnserveError

log = logging.getLogger("bnserve.service")


class BadRequestError(BnserveError):
    """The request body or its parameters are invalid (400)."""

    exit_code = 2
    http_status = 400


class ForbiddenError(BnserveError):
    """The route exists but this server's settings refuse it (403), e.g. model control none."""

    exit_code = 2
    http_status = 403


class RequestTimeoutError(BnserveError):
    """The client did not send the whole body in time (408); the connection is closed."""

    exit_code = 2
    http_status = 408


class NotFoundError(BnserveError):
    """An unknown model, version or route (404)."""

    exit_code = 2
    http_status = 404


class PayloadTooLargeError(BnserveError):
    """The body is over the size limit, or it has more rows than --max-batch (413)."""

    exit_code = 2
    http_status = 413


class GatewayTimeoutError(BnserveError):
    """Work the request waits for (a model reload) did not finish in time (504)."""

    exit_code = 1
    http_status = 504


class NotReadyError(BnserveError):
    """The model exists but is not loaded (503): retry later or check the server log."""

    exit_code = 1
    http_status = 503


def json_error(status: int, message: str) -> Response:
    """The protocol's error shape, shared by the simple API and the Open Inference Protocol."""
    return Response(orjson.dumps({"error": message}), status=status, mimetype="application/json")


def install_error_handlers(app: Flask) -> None:
    """Map every exception a request can raise to a JSON error with the right status."""

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
