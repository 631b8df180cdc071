"""The WSGI application of every worker: request ids, auth, the state watch, the body deadline,
routing through the one route table (service/api.py), error mapping, metrics and the access log.

Installed as the Flask app's `wsgi_app` (the usual middleware slot), so gunicorn and Flask's test
client both go through it, and it answers every request itself: no route needs what Flask does
per request (context push, URL map matching, session, signals, response object). Per request it:

- takes `X-Request-ID` from the request when it is a sane token (else makes one: a per-worker
  random prefix and a counter, no syscall) and echoes it in the response;
- continues a W3C `traceparent` (the caller's trace id, a span id of this request, the caller's
  flags) in the response and writes the trace id into the access log line;
- checks the bearer token when auth is on (service/auth.py), before the body is read;
- switches models, tokens or draining when a new state was published (8 shared bytes,
  service/reload.py);
- bounds the time to receive the body (service/body.py `TimedInput`);
- finds the route (404 for an unknown path, 405 with `Allow` for a wrong method), calls its
  handler, and turns a `BnserveError` into its status and `{"error": ...}` (service/errors.py);
- counts the request (route template, method, status; latency histogram; in-flight gauge) and
  writes one JSON access-log line straight to stderr (one `write`, atomic between workers).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from bnserve.errors import BnserveError
from bnserve.service import tracing
from bnserve.service.api import FIXED_PATHS, ROUTES
from bnserve.service.auth import BearerAuth
from bnserve.service.body import TimedInput
from bnserve.service.config import ServiceConfig
from bnserve.service.errors import error_body, status_line
from bnserve.service.logs import SANE_REQUEST_ID, AccessLog
from bnserve.service.registry import ModelRegistry
from bnserve.service.reload import StateFollower
from bnserve.service.routes import Call, json_headers, match

log = logging.getLogger("bnserve.service")

UNMATCHED = "unmatched"  # the route label of 404s: random paths must not become label values
REQUEST_ID_HEADER = "X-Request-ID"
# W3C trace context: version-trace_id-parent_id-flags, lowercase hex; all-zero ids are invalid.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16


def trace_of(header: str | None) -> tuple[str, str] | None:
    """(trace id, flags) of a valid `traceparent` header, else None (then it is ignored)."""
    if header is None:
        return None
    found = _TRACEPARENT.fullmatch(header.strip())
    if found is None:
        return None
    version, trace_id, parent_id, flags = found.groups()
    if version == "ff" or trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, flags


class Gateway:
    """The WSGI callable installed as the Flask app's `wsgi_app` (see the module docstring)."""

    def __init__(
        self,
        config: ServiceConfig,
        registry: ModelRegistry,
        metrics: Any = None,
        access_log: AccessLog | None = None,
        auth: BearerAuth | None = None,
        store: Any = None,
        openapi: bytes = b"",
        tracer: Any = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.access_log = access_log
        self.auth = auth
        self.store = store
        self.openapi = openapi
        self.tracer = tracer  # OpenTelemetry (service/tracing.py), when OTEL_* asks for it
        self.follower = StateFollower(store, registry, config, auth) if store is not None else None
        self._cooperative = gevent_patched()
        self._prefix = os.urandom(6).hex() + "-"
        self._count = itertools.count(1)

    # -- the per-request work -----------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        start = time.perf_counter()
        request_id = environ.get("HTTP_X_REQUEST_ID")
        if request_id is None or SANE_REQUEST_ID.fullmatch(request_id) is None:
            request_id = self._prefix + format(next(self._count), "x")
        environ["bnserve.request_id"] = request_id
        stream = environ.get("wsgi.input")
        if stream is not None:
            environ["wsgi.input"] = TimedInput(
                stream,
                environ.get("gunicorn.socket"),
                time.monotonic() + self.config.body_timeout,
                self._cooperative,
            )
        span = None
        if self.tracer is not None:
            span = tracing.RequestSpan(
                self.tracer, environ["REQUEST_METHOD"], environ.get("HTTP_TRACEPARENT")
            )
        metrics = self.enter()
        try:
            code, headers, body, route = self._dispatch(environ)
        except Exception as exc:  # a bug: log it, answer JSON, keep serving
            log.exception(
                "unhandled error in %s %s", environ["REQUEST_METHOD"], environ.get("PATH_INFO")
            )
            body = error_body(f"internal error: {type(exc).__name__}")
            code, headers, route = 500, json_headers(body), UNMATCHED
        finally:
            if metrics is not None:
                metrics.in_flight.dec()
        headers.append((REQUEST_ID_HEADER, request_id))
        trace = trace_of(environ.get("HTTP_TRACEPARENT"))
        if span is not None:  # the exported span is this request's
            span.end(route, environ["REQUEST_METHOD"], code)
            headers.append(("traceparent", span.traceparent()))
        elif trace is not None:  # continue the caller's trace: its id, this request's span
            span_id = self._prefix[:8] + format(next(self._count) & 0xFFFFFFFF, "08x")
            headers.append(("traceparent", f"00-{trace[0]}-{span_id}-{trace[1]}"))
        start_response(status_line(code), headers)
        seconds = time.perf_counter() - start
        status = code
        method = environ["REQUEST_METHOD"]
        if metrics is not None:
            metrics.observe_request(route, method, str(status), seconds)
        if self.access_log is not None:
            self.access_log.write(
                request_id,
                method,
                environ.get("PATH_INFO", ""),
                route,
                status,
                seconds,
                len(body),
                trace_id=None if trace is None else trace[0],
                peer=f"{environ.get('REMOTE_ADDR')}:{environ.get('REMOTE_PORT')}",
            )
        return [body]

    def enter(self) -> Any:
        """Before answering a request (or a gRPC call, service/grpc_server.py): follow the
        published state, count it in flight; returns the metrics whose `in_flight` to
        decrement after it (None when not counting)."""
        if self.follower is not None:
            self.follower.follow()
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight.inc()
        return metrics

    def _dispatch(self, environ: dict[str, Any]) -> tuple[int, list, bytes, str]:
        path = environ.get("PATH_INFO") or "/"
        method = environ["REQUEST_METHOD"]
        if self.auth is not None:
            challenge = self.auth.check(environ)
            if challenge is not None:
                body = error_body("missing or invalid bearer token (Authorization: Bearer ...)")
                return (
                    401,
                    json_headers(body, (("WWW-Authenticate", challenge),)),
                    body,
                    path_route(path),
                )
        route, params, allowed = match(ROUTES, method, path)
        if route is None:
            return self._unrouted(method, path, allowed)
        call = Call(environ, method, params, self.registry, self.config, self.store, self.openapi)
        try:
            status, headers, body = route.handler(call)
        except BnserveError as exc:
            status, body = exc.http_status, error_body(str(exc))
            if status >= 500 and status != 503:
                log.error("%s %s failed: %s", method, path, exc)
            headers = json_headers(body)
        return status, headers, body, route.rule

    def _unrouted(self, method: str, path: str, allowed: tuple[str, ...]) -> tuple:
        """404 for an unknown path; 405 (or the answer to OPTIONS) for a known one."""
        if not allowed:
            body = error_body(f"no route {method} {path}")
            return 404, json_headers(body), body, UNMATCHED
        allow = (("Allow", ", ".join(allowed)),)
        if method == "OPTIONS":
            return 200, [("Content-Length", "0"), *allow], b"", UNMATCHED
        methods = ", ".join(m for m in allowed if m != "OPTIONS")
        body = error_body(f"method {method} is not allowed for {path} (allowed: {methods})")
        return 405, json_headers(body, allow), body, UNMATCHED


def gevent_patched() -> bool:
    """Whether this process runs under gevent's monkey patch (gunicorn's gevent worker)."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


def path_route(path: str) -> str:
    """A bounded route label for requests answered before routing (401)."""
    return path if path in FIXED_PATHS else "unauthenticated"
