"""The service's error types and the one error shape every layer answers with.

Handlers raise `BnserveError` subclasses (each carries its HTTP status). Whoever answers (the
gateway's hot routes, the Flask handlers installed by service/app.py, gunicorn's own refusals of
malformed HTTP in service/gunicorn_conf.py) writes `error_body(message)` under `status_line(code)`,
so a client never sees an HTML page or a traceback, only `{"error": "..."}`. The gRPC server
(service/grpc_server.py) answers the same error with the status code `grpc_status(code)` and the
message as its details. No Flask or grpc here: the gunicorn master imports this module.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson

from bnserve.errors import BnserveError

# "404 Not Found" for every status Python knows, computed once (the hot path looks it up).
_STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in HTTPStatus}


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


# The gRPC status code (a `grpc.StatusCode` name) of each HTTP status an error may carry: an error
# is declared once, with its HTTP status, and answers gRPC clients with the code listed here.
GRPC_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",  # model control is off
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",  # over --max-batch (grpc answers a message over the size limit so)
    500: "INTERNAL",
    503: "UNAVAILABLE",  # the model version is not loaded (yet)
    504: "DEADLINE_EXCEEDED",  # a load or unload still running
}


def grpc_status(http_status: int) -> str:
    """The gRPC status code name for an error answered over HTTP with `http_status`."""
    return GRPC_STATUS.get(http_status, "INTERNAL" if http_status >= 500 else "UNKNOWN")


def error_body(message: str) -> bytes:
    """The protocol's error shape, shared by the simple API and the Open Inference Protocol."""
    return orjson.dumps({"error": message})


def status_line(code: int) -> str:
    """The WSGI status line for `code` ("413 Request Entity Too Large")."""
    return _STATUS_LINES.get(code) or f"{code} Error"
