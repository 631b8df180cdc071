"""The route table and its lookup, without a socket: every rule once, 404 vs 405, HEAD and
OPTIONS, parameters, and the table is what Flask's URL map and the OpenAPI document list."""

from __future__ import annotations

from bnserve.service.api import ROUTES
from bnserve.service.routes import match


def test_each_rule_and_method_is_declared_once() -> None:
    pairs = [(route.rule, method) for route in ROUTES for method in route.methods]
    assert len(pairs) == len(set(pairs))


def test_lookup_finds_the_route_and_its_parameters() -> None:
    route, params, _ = match(ROUTES, "POST", "/v2/models/digits/versions/2/infer")
    assert route.rule == "/v2/models/<name>/versions/<version>/infer"
    assert params == {"name": "digits", "version": "2"}
    route, params, _ = match(ROUTES, "HEAD", "/models/m/predict")  # HEAD wherever GET is
    assert (route.rule, params) == ("/models/<name>/predict", {"name": "m"})
    route, _, _ = match(ROUTES, "GET", "/openapi.json")
    assert route.rule == "/openapi.json"


def test_unknown_paths_and_wrong_methods() -> None:
    assert match(ROUTES, "GET", "/openapiXjson") == (None, {}, ())  # "." is not a wildcard
    assert match(ROUTES, "POST", "/v2/models//infer") == (None, {}, ())  # empty name
    assert match(ROUTES, "GET", "/v2/models/m/infer/x") == (None, {}, ())
    route, _, allowed = match(ROUTES, "PUT", "/predict")
    assert route is None and allowed == ("GET", "HEAD", "OPTIONS", "POST")
    route, _, allowed = match(ROUTES, "GET", "/v2/models/m/infer")
    assert route is None and allowed == ("OPTIONS", "POST")
