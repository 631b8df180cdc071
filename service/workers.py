"""bnserve's gunicorn worker classes: gunicorn's own, with what serving many kept-alive clients
from one process needs.

`GeventWorker` yields to the other connections after every response. gevent switches greenlets
only when one would block: with a keep-alive client that sends its next request as soon as it
reads the answer, that request is often already in the socket when the handler loops back to
read it, so the handler serves the same connection again and again while the others wait.
Measured with one worker and 64 kept-alive wrk connections (2-core machine): gunicorn's gevent
worker p50 0.4 ms, p99 780-810 ms (a few connections served, the rest starved); with one
`gevent.sleep(0)` per request, which puts the handler behind every other ready connection
(round-robin, as a sync worker's accept queue is), p50 20 ms, p99 26-31 ms.
"""

from __future__ import annotations

from typing import Any

import gevent
from gunicorn.workers.ggevent import GeventWorker as _GunicornGeventWorker


class GeventWorker(_GunicornGeventWorker):
    """gunicorn's gevent worker, fair between kept-alive connections."""

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            gevent.sleep(0)
