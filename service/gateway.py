"""The WSGI layer in front of the Flask routes: request ids, auth, metrics, access log, reload
watch, body deadline, and the hot routes served without Flask's per-request machinery.

Installed as `app.wsgi_app` (the usual Flask middleware slot), so gunicorn and Flask's test client
both go through it. Per request it:

- takes `X-Request-ID` from the request when it is a sane token (else makes one: a per-worker
  random prefix and a counter, no syscall) and echoes it in the response;
- checks the bearer token when auth is on (service/auth.py), before the body is read;
- switches models, tokens or draining when a new state was published (8 shared bytes,
  service/reload.py);
- answers `POST /predict` and `POST /v2/models/{m}[/versions/{v}]/infer` itself: the hot
  routes need none of what Flask does per request (context push, URL map matching, session,
  signals, response object), only the body, the runtime and the same protocol functions the
  Flask routes call (service/simple_api.py, service/v2.py). Every other route goes to Flask;
- bounds the time to receive the body (service/body.py `TimedInput`);
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

import orjson

from bnserve.errors import BnserveError
from bnserve.service.auth import BearerAuth
from bnserve.service.body import TimedInput, read_body
from bnserve.service.config import ServiceConfig
from bnserve.service.errors import error_body, status_line
from bnserve.service.metrics import render
from bnserve.service.registry import ModelRegistry
from bnserve.service.simple_api import predict_body
from bnserve.service.v2 import infer

log = logging.getLogger("bnserve.service")

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
_JSON = "application/json"
UNMATCHED = "unmatched"  # the route label of 404s: random paths must not become label values
REQUEST_ID_HEADER = "X-Request-ID"


class AccessLog:
    """One JSON object per line on stderr: time, request id, method, path, route, status, ms."""

    def __init__(self, fd: int = 2) -> None:
        self.fd = fd
        self.pid = os.getpid()

    def write(
        self,
        request_id: str,
        method: str,
        path: str,
        route: str,
        status: int,
        seconds: float,
        size: int,
    ) -> None:
        line = orjson.dumps(
            {
                "ts": round(time.time(), 3),
                "level": "info",
                "logger": "bnserve.access",
                "request_id": request_id,
                "method": method,
                "path": path[:256],
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000.0, 3),
                "bytes": size,
                "pid": self.pid,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        try:  # noqa: SIM105 (suppress() costs more on the hot path)
            os.write(self.fd, line)
        except OSError:  # a closed stderr must not fail requests
            pass


class Gateway:
    """The WSGI callable around Flask's `wsgi_app` (see the module docstring)."""

    def __init__(
        self,
        flask_wsgi: Callable[..., Iterable[bytes]],
        config: ServiceConfig,
        registry: ModelRegistry,
        metrics: Any = None,
        access_log: AccessLog | None = None,
        auth: BearerAuth | None = None,
        store: Any = None,
        openapi: bytes | None = None,
    ) -> None:
        self.flask_wsgi = flask_wsgi
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.access_log = access_log
        self.auth = auth
        self.store = store
        self.openapi = openapi
        self._generation = store.generation_watch() if store is not None else None
        self._cooperative = gevent_patched()
        self._prefix = os.urandom(6).hex() + "-"
        self._count = itertools.count(1)

    # -- the per-request work -----------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        start = time.perf_counter()
        request_id = environ.get("HTTP_X_REQUEST_ID")
        if request_id is None or _REQUEST_ID.fullmatch(request_id) is None:
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
        if self.store is not None:
            self._watch()
        metrics = self.metrics
        if metrics is not None:
            metrics.in_flight.inc()
        try:
            code, headers, body, route = self._dispatch(environ)
        except Exception as exc:  # a bug: log it, answer JSON, keep serving
            log.exception(
                "unhandled error in %s %s", environ["REQUEST_METHOD"], environ.get("PATH_INFO")
            )
            body = error_body(f"internal error: {type(exc).__name__}")
            code, headers, route = 500, self._headers(body), UNMATCHED
        finally:
            if metrics is not None:
                metrics.in_flight.dec()
        headers.append((REQUEST_ID_HEADER, request_id))
        start_response(status_line(code) if type(code) is int else code, headers)
        seconds = time.perf_counter() - start
        status = code if type(code) is int else int(code[:3])
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
            )
        return [body]

    def _dispatch(self, environ: dict[str, Any]) -> tuple[Any, list, bytes, str]:
        path = environ.get("PATH_INFO") or "/"
        method = environ["REQUEST_METHOD"]
        if self.auth is not None:
            challenge = self.auth.check(environ)
            if challenge is not None:
                body = error_body("missing or invalid bearer token (Authorization: Bearer ...)")
                return (
                    401,
                    self._headers(body, (("WWW-Authenticate", challenge),)),
                    body,
                    path_route(path),
                )
        if method == "POST":
            if path == "/predict":
                return self._predict(environ)
            target = v2_infer_target(path)
            if target is not None:
                return self._v2_infer(environ, *target)
        if path == "/metrics" or path == "/openapi.json":
            return self._plain(path, method)
        return self._flask(environ)

    @staticmethod
    def _headers(body: bytes, extra: tuple = (), content_type: str = _JSON) -> list:
        return [("Content-Type", content_type), ("Content-Length", str(len(body))), *extra]

    def _predict(self, environ: dict[str, Any]) -> tuple[Any, list, bytes, str]:
        """`POST /predict` without Flask: the same protocol code, errors as Flask maps them."""
        config = self.config
        try:
            body = predict_body(
                self.registry, None, None, environ, config.max_body_bytes, config.max_batch
            )
            code = 200
        except BnserveError as exc:
            code = exc.http_status
            body = error_body(str(exc))
        return code, self._headers(body), body, "/predict"

    def _v2_infer(
        self, environ: dict[str, Any], name: str, version: str | None
    ) -> tuple[Any, list, bytes, str]:
        """`POST /v2/models/{m}[/versions/{v}]/infer` without Flask, like `_predict`."""
        config = self.config
        route = V2_INFER_ROUTES[version is not None]
        try:
            runtime = self.registry.get(name, version)
            body = read_body(environ, config.max_body_bytes)
            payload, extra = infer(
                runtime, body, environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH"), config.max_batch
            )
        except BnserveError as exc:
            body = error_body(str(exc))
            return exc.http_status, self._headers(body), body, route
        headers = [("Content-Length", str(len(payload))), *extra.items()]
        return 200, headers, payload, route

    def _plain(self, path: str, method: str) -> tuple[Any, list, bytes, str]:
        if method not in ("GET", "HEAD"):
            body = error_body(f"method {method} is not allowed for {path} (allowed: GET, HEAD)")
            return 405, self._headers(body, (("Allow", "GET, HEAD"),)), body, path
        if path == "/openapi.json" and self.openapi is not None:
            return 200, self._headers(self.openapi), self.openapi, path
        if path == "/metrics":
            body, content_type = render()
            return 200, self._headers(body, (), content_type), body, path
        body = error_body(f"no route {method} {path}")
        return 404, self._headers(body), body, UNMATCHED

    def _flask(self, environ: dict[str, Any]) -> tuple[Any, list, bytes, str]:
        captured: list[Any] = []

        def start_response(status: str, headers: list, exc_info: Any = None) -> Callable:
            captured[:] = [status, headers]
            return _no_write

        result = self.flask_wsgi(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        status, headers = captured
        return status, list(headers), body, environ.get("bnserve.route") or UNMATCHED

    def _watch(self) -> None:
        """Switch models (or tokens, or start draining) when a new state was published: one
        shared-memory read per request (service/reload.py)."""
        generation = self._generation.current()
        if generation == self.registry.generation:
            return
        try:
            state = self.store.read()
        except (OSError, ValueError) as exc:
            log.error("cannot read the model state %s: %s", self.store.state_path, exc)
            return
        config = self.config
        tokens_before = self.registry.tokens_sha256
        self.registry.apply_state(state, config.device, config.intra_op_threads, config.output_kind)
        if self.auth is not None and self.registry.tokens_sha256 != tokens_before:
            self._reload_tokens()

    def _reload_tokens(self) -> None:
        """The master validated the new token file before publishing it: read its copy."""
        try:
            self.auth.tokens = self.store.read_tokens()
        except OSError as exc:  # keep the tokens in force rather than open or lock out
            log.error("cannot read the new tokens %s: %s", self.store.tokens_path, exc)
            return
        log.info("bearer tokens reloaded (%d token(s))", len(self.auth.tokens))


# The Flask rule strings: the metrics and access log label these requests as Flask would.
V2_INFER_ROUTES = {
    False: "/v2/models/<name>/infer",
    True: "/v2/models/<name>/versions/<version>/infer",
}


def v2_infer_target(path: str) -> tuple[str, str | None] | None:
    """(model, version or None) when `path` is a V2 infer route, else None."""
    if not (path.startswith("/v2/models/") and path.endswith("/infer")):
        return None
    parts = path[len("/v2/models/") : -len("/infer")].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None


def gevent_patched() -> bool:
    """Whether this process runs under gevent's monkey patch (gunicorn's gevent worker)."""
    try:
        from gevent import monkey
    except ImportError:
        return False
    return bool(monkey.is_module_patched("socket"))


def path_route(path: str) -> str:
    """A bounded route label for requests answered before routing (401)."""
    return path if path in ("/predict", "/metrics", "/openapi.json") else "unauthenticated"


def _no_write(data: bytes) -> None:
    raise RuntimeError("the write() callable of start_response is not supported")
