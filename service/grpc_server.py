"""The gRPC process: the Open Inference Protocol and the standard health service
(grpc.health.v1.Health, Check) on `--grpc-port`, next to the gunicorn workers.

The gunicorn master starts `--grpc-workers` of these (`python -m bnserve.service.grpc_server
RUNTIME_DIR`, a fresh interpreter: nothing inherited from the master), restarts one that dies,
kills one that stops touching its heartbeat file for --timeout seconds (`Heartbeat`: frozen, or
every thread stuck in a call) and stops them with the workers (service/gunicorn_conf.py
`GrpcProcesses`). Each builds the app a
worker builds (`create_app`: the models from the store's copies, the bearer tokens, metrics, the
state follower) and answers gRPC from that state on a pool of real threads; it never serves
HTTP. So a gRPC call is served with the same registry code, the same hot reload, token reload
and draining (`StateFollower.follow` before every call, as the HTTP gateway does), the same
auth, metrics and access log as an HTTP request, and grpc never runs under gevent's monkey patch:
with grpc's gevent support (`grpc.experimental.gevent`, experimental) in the workers a call cost
2.3-2.5x the server CPU of an HTTP V2 infer, here 1.2-1.6x (docs/architecture.md). Several gRPC
processes share the port with SO_REUSEPORT: the kernel spreads connections over them.

Per call: a request id (`x-request-id` metadata, else a new one, sent back as initial metadata),
the state watch, the bearer token (the `authorization` metadata; the health methods are open, as
their HTTP routes are), the method, then a `BnserveError` becomes the status code of
service/errors.py `GRPC_STATUS` with the message as details, an unexpected exception INTERNAL
(logged). Counted in `bnserve_grpc_requests_total{method,code}` and
`bnserve_grpc_request_duration_seconds{method}`, and one access-log line.

A message over --max-body-mb is refused by grpc itself (RESOURCE_EXHAUSTED) before any handler
runs; more rows than --max-batch is RESOURCE_EXHAUSTED from the decoder (HTTP: 413). Messages
are parsed in the handler, after the token check: bytes that are not the method's message are
INVALID_ARGUMENT (grpc's own parsing would answer INTERNAL, uncounted).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from bnserve.errors import BnserveError
from bnserve.service import grpc_api
from bnserve.service.config import (
    GRPC_BOOT_ERROR,
    ServiceConfig,
    bracketed,
    grpc_heartbeat_path,
)
from bnserve.service.errors import grpc_status
from bnserve.service.logs import SANE_REQUEST_ID, configure_logging
from bnserve.service.reload import ModelStore

log = logging.getLogger("bnserve.service")

REQUEST_ID = "x-request-id"
UNAUTHENTICATED = "missing or invalid bearer token (metadata authorization: Bearer <token>)"
# Calls served at once by one process; onnxruntime releases the GIL while it runs, and a load
# or unload call waits for the reload runner on its thread.
THREADS = 8


class GrpcServer:
    """A gRPC server over the serving state that an app's gateway holds (service/gateway.py:
    registry, store, auth, state follower, metrics, access log)."""

    def __init__(self, gateway: Any, config: ServiceConfig, threads: int = THREADS) -> None:
        self.gateway = gateway
        self.config = config
        self.worker = grpc_api.Worker(gateway.registry, config, gateway.store)
        self._prefix = os.urandom(6).hex() + "-g"
        self._count = itertools.count(1)
        self.executor = futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="bnserve-grpc"
        )
        self.server = grpc.server(
            self.executor,
            maximum_concurrent_rpcs=config.grpc_max_calls,
            options=[
                ("grpc.max_receive_message_length", config.max_body_bytes),
                ("grpc.so_reuseport", 1),
                *connection_age(config.grpc_max_connection_age, config.timeout),
            ],
        )
        for service in grpc_api.SERVICES:
            handlers = {
                method.name: grpc.unary_unary_rpc_method_handler(
                    self._handler(method),
                    # parsed in the handler: a malformed message is the client's error
                    # (INVALID_ARGUMENT, counted and logged), not grpc's INTERNAL
                    request_deserializer=None,
                    response_serializer=method.response_class.SerializeToString,
                )
                for method in grpc_api.METHODS
                if method.service is service
            }
            self.server.add_registered_method_handlers(service.full_name, handlers)
        self.address = f"{bracketed(config.host)}:{config.grpc_port}"
        self.server.add_insecure_port(self.address)  # RuntimeError when it cannot bind
        self.server.start()
        log.debug("gRPC (%s) on %s", services(), self.address)

    def _handler(self, method: grpc_api.Method) -> Callable[[Any, Any], Any]:
        """The grpc handler of `method`: request id, state watch, auth, errors, metrics, log."""
        gateway = self.gateway
        open_ = method.is_open(self.config.public_metrics)
        empty = method.response_class
        path = method.path

        def handle(payload: bytes, context: Any) -> Any:
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
                response, code = self._call(method, parse(method, payload)), "OK"
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
                    request_id,
                    "POST",
                    path,
                    path,
                    code,
                    seconds,
                    response.ByteSize(),
                    "grpc",
                    peer=context.peer().partition(":")[2],  # "ipv4:ADDRESS:PORT"
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

    def stop(self, grace: float | None = None) -> threading.Event:
        """Refuse new calls now; calls under way have `grace` seconds (default: the graceful
        timeout) to finish. The event is set once the server has stopped."""
        return self.server.stop(self.config.timeout if grace is None else grace)


def connection_age(seconds: float, grace: float) -> list[tuple[str, int]]:
    """grpc's options that close a connection `seconds` after it opened (a GOAWAY: the client
    reconnects, perhaps to another process or pod) with `grace` seconds for calls under way."""
    if seconds <= 0:
        return []
    return [
        ("grpc.max_connection_age_ms", int(seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(grace * 1000)),
    ]


def parse(method: grpc_api.Method, payload: bytes) -> Any:
    """The method's request message from the wire (_Refusal INVALID_ARGUMENT if it is not one)."""
    try:
        return method.request_class.FromString(payload)
    except DecodeError as exc:
        name = method.request_class.DESCRIPTOR.full_name
        raise _Refusal("INVALID_ARGUMENT", f"not a valid {name} message ({exc})") from None


class _Refusal(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def services() -> str:
    return ", ".join(service.full_name for service in grpc_api.SERVICES)


class Heartbeat:
    """Touches the heartbeat file from the server's own thread pool, one touch queued at a time:
    a process that is frozen, or whose every thread is stuck in a call, stops touching it, as a
    gunicorn worker stuck in a request stops notifying its master."""

    def __init__(self, path: Path, executor: futures.Executor) -> None:
        self.path = path
        self.executor = executor
        self.pending: futures.Future | None = None

    def tick(self) -> None:
        if self.pending is None or self.pending.done():
            self.pending = self.executor.submit(self.path.touch)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# -- the process ---------------------------------------------------------------------------------


def serve(runtime_dir: str, poll: float = 1.0) -> int:
    """Serve gRPC until SIGTERM or SIGINT (graceful: calls under way have the graceful timeout),
    or until the master is gone (its children must not outlive it, holding the port)."""
    from bnserve.service.app import create_app  # Flask, onnxruntime: this process only

    master = os.getppid()
    stopping = threading.Event()
    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, lambda *_: stopping.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads reach us through the state
    try:
        store = ModelStore(runtime_dir)
        config = store.config()
        configure_logging(config.log_level)
        server = GrpcServer(create_app(config).wsgi_app, config)
        store.set_grpc_serving()  # readiness may now say yes
    except Exception:  # no state, no models, a port it cannot bind: the master halts
        log.exception("the gRPC server cannot start")
        return GRPC_BOOT_ERROR
    log.info("gRPC process %d serving %s on %s", os.getpid(), services(), server.address)
    heartbeat = Heartbeat(grpc_heartbeat_path(runtime_dir, os.getpid()), server.executor)
    heartbeat.tick()
    while not stopping.wait(poll):
        if os.getppid() != master:
            log.warning("the gunicorn master is gone: stopping the gRPC process")
            break
        heartbeat.tick()
    server.stop().wait(config.timeout + 1)
    heartbeat.remove()
    return 0


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
