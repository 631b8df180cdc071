"""The route table and its lookup, without a socket: every rule once, 404 vs 405, HEAD and
OPTIONS, parameters, and the table is what Flask's URL map and the OpenAPI document list."""

from __future__ import annotations

import re

import pytest

from bnserve.service.api import ROUTES, open_paths
from bnserve.service.config import ServiceConfig
from bnserve.service.openapi import openapi_document
from bnserve.service.registry import ModelRegistry
from bnserve.service.routes import Doc, Route, match


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


def test_a_route_cannot_be_declared_without_its_documentation() -> None:
    handler = ROUTES[0].handler
    doc = Doc("summary", "Health", "ok")
    with pytest.raises(ValueError, match="one Doc per method"):
        Route("/new", ("GET", "POST"), handler, {"GET": doc})
    with pytest.raises(ValueError, match="one Doc per method"):
        Route("/new", ("GET",), handler, {"GET": doc, "PUT": doc})
    with pytest.raises(ValueError, match="unknown access"):
        Route("/new", ("GET",), handler, {"GET": doc}, access="everyone")


def test_the_openapi_document_is_written_from_the_table() -> None:
    registry = ModelRegistry({}, None)
    document = openapi_document(registry, ServiceConfig.from_mapping({"model": "unused"}))
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    declared = {
        (route.rule.replace("<", "{").replace(">", "}"), method.lower())
        for route in ROUTES
        for method in route.methods
    }
    assert documented == declared
    for route in ROUTES:
        path = route.rule.replace("<", "{").replace(">", "}")
        for method, doc in route.docs.items():
            operation = document["paths"][path][method.lower()]
            assert operation["summary"] == doc.summary
            assert set(operation["responses"]) == {"200", *map(str, doc.errors)}
            assert ("requestBody" in operation) == bool(doc.request)
            names = [p.get("name") for p in operation["parameters"] if p.get("in") == "path"]
            assert names == re.findall(r"<([a-z_]+)>", route.rule)


def test_open_paths_follow_the_table() -> None:
    assert open_paths(False) == {"/health", "/v2/health/live", "/v2/health/ready"}
    assert open_paths(True) == {"/health", "/v2/health/live", "/v2/health/ready", "/metrics"}
