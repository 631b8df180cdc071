"""Every HTTP route of the service, in one table, and the lookup the gateway answers from.

A route is its methods, its rule (Flask's syntax: `/v2/models/<name>/infer`; also the `route`
label of the metrics and the access log), a handler (a plain function of a `Call` that returns
`(status, headers, body)` or raises a `BnserveError`), who may call it without a token, and one
`Doc` per method. The gateway (service/gateway.py) dispatches every request through `match`, the
bearer-token check reads `Route.access`, `app.py` registers the same table in Flask's URL map, and
service/openapi.py writes the OpenAPI document from the `Doc`s: a route declared without a `Doc`
for each of its methods is refused when the table is built, so none can go undocumented.
HEAD is answered wherever GET is.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
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
class Doc:
    """What the OpenAPI document says about one method of a route."""

    summary: str
    response: str  # the 200 body: a schema name in service/openapi.py, "" for plain text
    answered: str  # what a 200 means
    errors: tuple[int, ...] = ()  # statuses besides 200 (401 is added when auth is on)
    request: str = ""  # the body's schema name; "" for no body
    request_required: bool = True
    binary: bool = False  # the binary tensor extension: octet-stream bodies and their header


#: Route.access: who may call without a token.
TOKEN = "token"  # a token is needed whenever auth is on
OPEN = "open"  # never needs one: health probes carry no token
PUBLIC_METRICS = "public-metrics"  # open when --public-metrics is given


@dataclass(frozen=True)
class Route:
    rule: str
    methods: tuple[str, ...]
    handler: Callable[[Call], Answer]
    docs: Mapping[str, Doc] = field(compare=False)
    access: str = TOKEN
    pattern: re.Pattern = field(init=False, compare=False)

    def __post_init__(self) -> None:
        undocumented = sorted(set(self.methods) - set(self.docs))
        if undocumented or set(self.docs) - set(self.methods):
            raise ValueError(
                f"route {self.rule}: one Doc per method is needed "
                f"(methods {list(self.methods)}, documented {sorted(self.docs)})"
            )
        if self.access not in (TOKEN, OPEN, PUBLIC_METRICS):
            raise ValueError(f"route {self.rule}: unknown access {self.access!r}")
        regex = re.sub(r"<([a-z_]+)>", r"(?P<\1>[^/]+)", re.escape(self.rule))
        object.__setattr__(self, "pattern", re.compile(regex + r"\Z"))

    @property
    def allowed(self) -> tuple[str, ...]:
        """The methods a request may use: HEAD wherever GET is, and OPTIONS."""
        extra = ("HEAD",) if "GET" in self.methods else ()
        return tuple(sorted({*self.methods, *extra, "OPTIONS"}))


def is_open(route: Route, public_metrics: bool) -> bool:
    """Whether `route` is answered without a token."""
    return route.access == OPEN or (route.access == PUBLIC_METRICS and public_metrics)


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
