"""The service's log lines next to gunicorn's, on stderr, with the process id (workers differ),
and the JSON access log of HTTP requests and gRPC calls."""

from __future__ import annotations

import logging
import os
import re
import sys
import time

import orjson

# A request id taken from the client (X-Request-ID header, x-request-id gRPC metadata) when it is
# a sane token; otherwise the server makes one.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")


def configure_logging(level: str) -> None:
    """Our log lines next to gunicorn's, on stderr, with the process id (workers differ)."""
    logger = logging.getLogger("bnserve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S %z"
            )
        )
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


class AccessLog:
    """One JSON object per line on stderr: time, request id, method, path, route, status, ms,
    protocol, and the client's address and port (`peer`). A gRPC call is logged with method POST
    (as it travels), its full method name as path and route, and its status code name ("OK",
    "NOT_FOUND") as status."""

    def __init__(self, fd: int = 2) -> None:
        self.fd = fd
        self.pid = os.getpid()

    def write(
        self,
        request_id: str,
        method: str,
        path: str,
        route: str,
        status: int | str,
        seconds: float,
        size: int,
        protocol: str = "http",
        trace_id: str | None = None,
        peer: str | None = None,
    ) -> None:
        line = orjson.dumps(
            {
                "ts": round(time.time(), 3),
                "level": "info",
                "logger": "bnserve.access",
                "request_id": request_id,
                "trace_id": trace_id,
                "method": method,
                "path": path[:256],
                "route": route,
                "status": status,
                "duration_ms": round(seconds * 1000.0, 3),
                "bytes": size,
                "pid": self.pid,
                "protocol": protocol,
                "peer": peer,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )
        try:  # noqa: SIM105 (suppress() costs more on the hot path)
            os.write(self.fd, line)
        except OSError:  # a closed stderr must not fail requests
            pass
