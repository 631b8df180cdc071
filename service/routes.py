"""Every HTTP route of the service, in one table, and the lookup the gateway answers from.

A route is its methods, its rule (Flask's syntax: `/v2/models/<name>/infer`; also the `route`
label of the metrics and the access log) and a handler: a plain function of a `Call` that returns
`(status, headers, body)` or raises a `BnserveError`. The gateway (service/gateway.py) dispatches
every request through `match`, and `app.py` registers the same table in Flask's URL map, so the
OpenAPI document and its test enumerate one list. HEAD is answered wherever GET is.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bnserve.service.config import ServiceConfig

Answer = tuple[int, list[tuple[str, str]], bytes]
JSON = "application/json"


@dataclass
class Call:
    """What a handler gets: the request, its path parameters and the worker's state."""

    environ: dict[str, Any]
    method: str
    params: dict[str, str]
    registry: Any  # service.registry.ModelRegistry
    config: ServiceConfig
    store: Any = None  # service.reload.ModelStore, under `bnserve serve`
    openapi: bytes = b""


def json_headers(body: bytes, extra: tuple = ()) -> list[tuple[str, str]]:
    return [("Content-Type", JSON), ("Content-Length", str(len(body))), *extra]


def json_answer(body: bytes, status: int = 200) -> Answer:
    return status, json_headers(body), body


@dataclass(frozen=True)
class Route:
    rule: str
    methods: tuple[str, ...]
    handler: Callable[[Call], Answer]
    pattern: re.Pattern = field(init=False, compare=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"<([a-z_]+)>", r"(?P<\1>[^/]+)", re.escape(self.rule))
        object.__setattr__(self, "pattern", re.compile(regex + r"\Z"))

    @property
    def allowed(self) -> tuple[str, ...]:
        """The methods a request may use: HEAD wherever GET is, and OPTIONS."""
        extra = ("HEAD",) if "GET" in self.methods else ()
        return tuple(sorted({*self.methods, *extra, "OPTIONS"}))


def match(
    routes: tuple[Route, ...], method: str, path: str
) -> tuple[Route | None, dict[str, str], tuple[str, ...]]:
    """(the route for `method` and `path`, its parameters, the methods `path` allows).

    No route and no allowed methods: 404. No route but allowed methods: 405 (or OPTIONS)."""
    allowed: set[str] = set()
    for route in routes:
        found = route.pattern.match(path)
        if found is None:
            continue
        if method in route.methods or (method == "HEAD" and "GET" in route.methods):
            return route, found.groupdict(), route.allowed
        allowed.update(route.allowed)
    return None, {}, tuple(sorted(allowed))
