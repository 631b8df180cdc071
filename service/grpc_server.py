"""The gRPC server of a gunicorn worker: the Open Inference Protocol on `--grpc-port`.

Every worker runs one, next to its HTTP server, on the same port: grpc binds with SO_REUSEPORT,
so the kernel spreads new connections over the workers as the shared listening socket spreads
HTTP ones (a connection then stays with its worker; HTTP/2 multiplexes a client's calls over
it). A worker's gRPC calls use the worker's own state: the same registry (models and versions),
the same state watch (hot reload, token reload, draining: `StateFollower.follow` before every
call, as the HTTP gateway does), the same bearer tokens, metrics and access log. So there is
nothing more to supervise: a recycled, killed or restarted worker takes its gRPC server with it.

Under the gevent worker (the default) grpc's gevent support is switched on first
(`grpc.experimental.gevent.init_gevent()`, after gunicorn's monkey patch): grpc then waits for
its completion queue without blocking the worker's event loop, and the method handlers run on
greenlets (the executor's threads are gevent's after the patch), so a gRPC call and an HTTP
request of one worker take turns as two HTTP requests do. Under the sync and gthread workers the
handlers run on a small pool of real threads.

Per call: a request id (`x-request-id` metadata, else a new one, sent back as initial metadata),
the state watch, the bearer token (the `authorization` metadata; the health methods are open, as
their HTTP routes are), the method, then a `BnserveError` becomes the status code of
service/errors.py `GRPC_STATUS` with the message as details, an unexpected exception INTERNAL
(logged). Counted in `bnserve_grpc_requests_total{method,code}` and
`bnserve_grpc_request_duration_seconds{method}`, and one access-log line.

A message over --max-body-mb is refused by grpc itself (RESOURCE_EXHAUSTED) before any handler
runs; more rows than --max-batch is RESOURCE_EXHAUSTED from the decoder (HTTP: 413).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from bnserve.errors import BnserveError
from bnserve.service import grpc_api
from bnserve.service import grpc_messages as pb
from bnserve.service.config import ServiceConfig, bracketed
from bnserve.service.errors import grpc_status
from bnserve.service.logs import SANE_REQUEST_ID

log = logging.getLogger("bnserve.service")

REQUEST_ID = "x-request-id"
UNAUTHENTICATED = "missing or invalid bearer token (metadata authorization: Bearer <token>)"
# Thread workers: handlers on real threads; onnxruntime releases the GIL while it runs.
THREAD_POOL = 4
_gevent_ready = False


class GrpcServer:
    """One worker's gRPC server over the worker's state, held by its HTTP gateway
    (service/gateway.py: registry, store, auth, state follower, metrics, access log)."""

    def __init__(self, gateway: Any, config: ServiceConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.worker = grpc_api.Worker(gateway.registry, config, gateway.store)
        self._prefix = os.urandom(6).hex() + "-g"
        self._count = itertools.count(1)
        cooperative = bool(gateway.cooperative)
        if cooperative:
            _init_gevent()
        pool = config.worker_connections if cooperative else max(THREAD_POOL, config.threads)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=pool, thread_name_prefix="bnserve-grpc"),
            options=[
                ("grpc.max_receive_message_length", config.max_body_bytes),
                ("grpc.so_reuseport", 1),
            ],
        )
        handlers = {
            method.name: grpc.unary_unary_rpc_method_handler(
                self._handler(method),
                request_deserializer=pb.message(_input_type(method.name)).FromString,
                response_serializer=pb.message(_output_type(method.name)).SerializeToString,
            )
            for method in grpc_api.METHODS
        }
        self.server.add_registered_method_handlers(pb.SERVICE.full_name, handlers)
        self.address = f"{bracketed(config.host)}:{config.grpc_port}"
        self.server.add_insecure_port(self.address)  # RuntimeError when it cannot bind
        self.server.start()
        log.debug("gRPC (inference.GRPCInferenceService) on %s", self.address)

    def _handler(self, method: grpc_api.Method) -> Callable[[Any, Any], Any]:
        """The grpc handler of `method`: request id, state watch, auth, errors, metrics, log."""
        gateway = self.gateway
        open_ = method.is_open(self.config.public_metrics)
        empty = pb.message(_output_type(method.name))
        path = f"/{pb.SERVICE.full_name}/{method.name}"

        def handle(request: Any, context: Any) -> Any:
            start = time.perf_counter()
            request_id = authorization = None
            for key, value in context.invocation_metadata():
                if key == REQUEST_ID and SANE_REQUEST_ID.fullmatch(value):
                    request_id = value
                elif key == "authorization":
                    authorization = value
            if request_id is None:
                request_id = self._prefix + format(next(self._count), "x")
            context.send_initial_metadata(((REQUEST_ID, request_id),))
            metrics = gateway.enter()
            try:
                auth = None if open_ else gateway.auth
                if auth is not None and auth.challenge(authorization) is not None:
                    raise _Refusal("UNAUTHENTICATED", UNAUTHENTICATED)
                response, code = self._call(method, request), "OK"
            except _Refusal as refusal:
                response, code = empty(), refusal.code
                context.set_code(grpc.StatusCode[code])
                context.set_details(refusal.message)
            finally:
                if metrics is not None:
                    metrics.in_flight.dec()
            seconds = time.perf_counter() - start
            if metrics is not None:
                metrics.observe_grpc(method.name, code, seconds)
            if gateway.access_log is not None:
                gateway.access_log.write(
                    request_id, "POST", path, path, code, seconds, response.ByteSize(), "grpc"
                )
            return response

        return handle

    def _call(self, method: grpc_api.Method, request: Any) -> Any:
        try:
            return method.handler(request, self.worker)
        except BnserveError as exc:
            if exc.http_status >= 500 and exc.http_status != 503:
                log.error("gRPC %s failed: %s", method.name, exc)
            raise _Refusal(grpc_status(exc.http_status), str(exc)) from None
        except Exception as exc:  # a bug: log it, answer INTERNAL, keep serving
            log.exception("unhandled error in gRPC %s", method.name)
            raise _Refusal("INTERNAL", f"internal error: {type(exc).__name__}") from None

    def stop_when(self, stopping: Callable[[], bool], poll: float = 0.5) -> None:
        """Start the graceful stop once `stopping()` is true (the worker got SIGTERM, or was
        recycled): gRPC then stops taking calls when HTTP does, and finishes the calls under way
        within the graceful timeout, as gunicorn does for HTTP."""

        def watch() -> None:
            while not stopping():
                time.sleep(poll)
            self.stop()

        threading.Thread(target=watch, name="bnserve-grpc-stop", daemon=True).start()

    def stop(self) -> threading.Event:
        """Refuse new calls now; calls under way have the graceful timeout to finish."""
        return self.server.stop(self.config.timeout)

    def close(self) -> None:
        """At the worker's exit (gunicorn's worker_exit hook): stop, and wait for the calls
        under way, within the graceful timeout."""
        with contextlib.suppress(Exception):  # the worker is leaving whatever happens
            self.stop().wait(self.config.timeout + 1)


class _Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _input_type(name: str) -> str:
    return pb.SERVICE.methods_by_name[name].input_type.name


def _output_type(name: str) -> str:
    return pb.SERVICE.methods_by_name[name].output_type.name


def _init_gevent() -> None:
    """grpc's gevent support: once per process, after the monkey patch, before grpc objects."""
    global _gevent_ready
    if not _gevent_ready:
        from grpc.experimental import gevent as grpc_gevent

        grpc_gevent.init_gevent()
        _gevent_ready = True
