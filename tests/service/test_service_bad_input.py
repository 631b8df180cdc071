"""Bad input never breaks the server: a 4xx JSON error that says what was expected, then it
keeps serving. Each case is sent over a real socket to the live gunicorn server."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import requests

from tests.service.support import MAX_BATCH, MAX_BODY_BYTES, N_FEATURES, LiveServer

ROW = [0.5] * N_FEATURES
PREDICT = "/predict"
INFER = "/v2/models/clf/infer"


def _tensor(**overrides) -> dict:
    tensor = {"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32", "data": ROW}
    tensor.update(overrides)
    return {"inputs": [{k: v for k, v in tensor.items() if v is not None}]}


# (id, method, path, raw body or JSON-able body, extra headers, status, message fragment)
CASES = [
    (
        "too-few-features",
        "POST",
        PREDICT,
        {"features": ROW[:-1]},
        {},
        400,
        f"expected {N_FEATURES} features, got {N_FEATURES - 1}",
    ),
    (
        "too-many-features",
        "POST",
        PREDICT,
        {"features": [*ROW, 1]},
        {},
        400,
        f"expected {N_FEATURES} features, got {N_FEATURES + 1}",
    ),
    (
        "string-feature",
        "POST",
        PREDICT,
        {"features": ["a", *ROW[1:]]},
        {},
        400,
        "features[0] must be a number, got a JSON string ('a')",
    ),
    (
        "numeric-string",
        "POST",
        PREDICT,
        {"features": ["1.5", *ROW[1:]]},
        {},
        400,
        "must be a number, got a JSON string",
    ),
    (
        "boolean-feature",
        "POST",
        PREDICT,
        {"features": [True, *ROW[1:]]},
        {},
        400,
        "must be a number, got a JSON boolean",
    ),
    (
        "nested-list",
        "POST",
        PREDICT,
        {"features": [ROW]},
        {},
        400,
        f"features[0] is a nested array: send a flat array of {N_FEATURES} numbers",
    ),
    (
        "null-feature",
        "POST",
        PREDICT,
        {"features": [None, *ROW[1:]]},
        {},
        400,
        "features[0] must be a number, got a JSON null",
    ),
    (
        "null-features",
        "POST",
        PREDICT,
        {"features": None},
        {},
        400,
        "'features' must be an array of 8 numbers or an object of feature names, got a JSON null",
    ),
    (
        "nan-literal",
        "POST",
        PREDICT,
        b'{"features": [NaN, 1, 2, 3, 4, 5, 6, 7]}',
        {},
        400,
        "NaN and Infinity are not valid JSON numbers",
    ),
    (
        "infinity-literal",
        "POST",
        PREDICT,
        b'{"features": [Infinity, 1, 2, 3, 4, 5, 6, 7]}',
        {},
        400,
        "invalid JSON",
    ),
    (
        "overflowing-number",
        "POST",
        PREDICT,
        b'{"features": [1e999, 1, 2, 3, 4, 5, 6, 7]}',
        {},
        400,
        "invalid JSON",
    ),
    (
        "float32-overflow",
        "POST",
        PREDICT,
        {"features": [1e39, *ROW[1:]]},
        {},
        400,
        "feature values must be finite numbers within float32 range",
    ),
    ("empty-body", "POST", PREDICT, b"", {}, 400, "empty request body"),
    ("invalid-json", "POST", PREDICT, b'{"features": [1, 2', {}, 400, "invalid JSON"),
    ("json-array-body", "POST", PREDICT, [1, 2, 3], {}, 400, "expected a JSON object"),
    (
        "no-features-key",
        "POST",
        PREDICT,
        {"x": ROW},
        {},
        400,
        "expected a JSON object with either 'features' or 'instances'",
    ),
    (
        "unknown-feature-name",
        "POST",
        PREDICT,
        {"features": {**{f"f{i}": 1.0 for i in range(7)}, "bogus": 1.0}},
        {},
        400,
        "unknown feature names 'bogus'",
    ),
    (
        "missing-feature-name",
        "POST",
        PREDICT,
        {"features": {f"f{i}": 1.0 for i in range(7)}},
        {},
        400,
        "missing 'f7'",
    ),
    (
        "bad-top-k",
        "POST",
        PREDICT,
        {"features": ROW, "top_k": 0},
        {},
        400,
        "top_k must be an integer from 1 to 3",
    ),
    (
        "too-many-rows",
        "POST",
        PREDICT,
        {"instances": [ROW] * (MAX_BATCH + 1)},
        {},
        413,
        f"too many rows: {MAX_BATCH + 1} instances, at most {MAX_BATCH}",
    ),
    (
        "bad-row-in-instances",
        "POST",
        PREDICT,
        {"instances": [ROW, ROW[:3]]},
        {},
        400,
        "instances[1]: expected 8 features, got 3",
    ),
    (
        "body-too-large",
        "POST",
        PREDICT,
        b"{" + b" " * MAX_BODY_BYTES + b"}",
        {},
        413,
        f"the limit is {MAX_BODY_BYTES}",
    ),
    (
        "unknown-model",
        "POST",
        "/models/nope/predict",
        {"features": ROW},
        {},
        404,
        "unknown model 'nope'",
    ),
    (
        "unknown-version",
        "POST",
        "/models/clf/versions/7/predict",
        {"features": ROW},
        {},
        404,
        "model 'clf' has no version '7' (versions: 1, 2, 10)",
    ),
    ("wrong-method-predict", "DELETE", PREDICT, None, {}, 405, "method DELETE is not allowed"),
    ("wrong-method-infer", "GET", INFER, None, {}, 405, "method GET is not allowed"),
    ("unknown-route", "GET", "/nothing/here", None, {}, 404, "no route GET /nothing/here"),
    (
        "v2-wrong-shape",
        "POST",
        INFER,
        _tensor(shape=[1, N_FEATURES - 1]),
        {},
        400,
        f"expected shape [batch, {N_FEATURES}], got [1, {N_FEATURES - 1}]",
    ),
    (
        "v2-rank-1-shape",
        "POST",
        INFER,
        _tensor(shape=[N_FEATURES]),
        {},
        400,
        f"expected shape [batch, {N_FEATURES}]",
    ),
    (
        "v2-wrong-datatype",
        "POST",
        INFER,
        _tensor(datatype="BYTES"),
        {},
        400,
        "datatype 'BYTES' is not supported",
    ),
    (
        "v2-data-count",
        "POST",
        INFER,
        _tensor(data=ROW[:-1]),
        {},
        400,
        f"its shape needs {N_FEATURES} values, 'data' has {N_FEATURES - 1}",
    ),
    (
        "v2-string-data",
        "POST",
        INFER,
        _tensor(data=["x"] * N_FEATURES),
        {},
        400,
        "element 0 must be a number for datatype FP32",
    ),
    (
        "v2-float-in-int-tensor",
        "POST",
        INFER,
        _tensor(datatype="INT32"),
        {},
        400,
        "element 0 must be an integer for datatype INT32",
    ),
    (
        "v2-int-out-of-range",
        "POST",
        INFER,
        _tensor(datatype="INT8", data=[300] * N_FEATURES),
        {},
        400,
        "values out of range for INT8",
    ),
    (
        "v2-wrong-input-name",
        "POST",
        INFER,
        _tensor(name="x"),
        {},
        400,
        "unexpected input 'x': the model's input is 'input'",
    ),
    ("v2-no-inputs", "POST", INFER, {"inputs": []}, {}, 400, "exactly one tensor"),
    (
        "v2-unknown-output",
        "POST",
        INFER,
        {**_tensor(), "outputs": [{"name": "bogus"}]},
        {},
        400,
        "unknown output 'bogus'",
    ),
    (
        "v2-bad-classification",
        "POST",
        INFER,
        {**_tensor(), "outputs": [{"name": "probabilities", "parameters": {"classification": 9}}]},
        {},
        400,
        "classification must be an integer from 1 to 3",
    ),
    (
        "v2-too-many-rows",
        "POST",
        INFER,
        _tensor(shape=[MAX_BATCH + 1, N_FEATURES], data=ROW * (MAX_BATCH + 1)),
        {},
        413,
        "too many rows",
    ),
    (
        "v2-binary-size-mismatch",
        "POST",
        INFER,
        _tensor(data=None, parameters={"binary_data_size": 4 * N_FEATURES}),
        {},
        400,
        "binary_data_size is 32 but the body carries 0 bytes",
    ),
    (
        "v2-header-length-too-big",
        "POST",
        INFER,
        _tensor(),
        {"Inference-Header-Content-Length": "99999"},
        400,
        "Inference-Header-Content-Length is 99999",
    ),
    (
        "v2-bad-header-length",
        "POST",
        INFER,
        _tensor(),
        {"Inference-Header-Content-Length": "abc"},
        400,
        "must be an integer",
    ),
    ("v2-unknown-model", "POST", "/v2/models/nope/infer", _tensor(), {}, 404, "unknown model"),
    ("v2-unknown-version", "GET", "/v2/models/clf/versions/x", None, {}, 404, "no version 'x'"),
    ("v2-nan-literal", "POST", INFER, b'{"inputs": [{"data": [NaN]}]}', {}, 400, "invalid JSON"),
    (
        "bad-content-encoding",
        "POST",
        INFER,
        _tensor(),
        {"Content-Encoding": "br"},
        400,
        "unsupported Content-Encoding 'br'",
    ),
    (
        "v2-ragged-nested-data",
        "POST",
        INFER,
        _tensor(shape=[2, N_FEATURES], data=[[*ROW, 0.5], ROW[1:]]),
        {},
        400,
        f"nested 'data' must be 2 arrays of {N_FEATURES} values each",
    ),
    (
        "v2-nested-too-deep",
        "POST",
        INFER,
        _tensor(data=[[ROW]]),
        {},
        400,
        f"nested 'data' must be 1 arrays of {N_FEATURES} values each",
    ),
    ("v2-id-not-a-string", "POST", INFER, {**_tensor(), "id": 7}, {}, 400, "'id' must be a string"),
    (
        "corrupt-gzip",
        "POST",
        INFER,
        b"not gzip",
        {"Content-Encoding": "gzip"},
        400,
        "not valid gzip data",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_gets_a_json_error_and_the_server_keeps_serving(
    server: LiveServer, method: str, path: str, body, headers: dict, status: int, message: str
) -> None:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    response = requests.request(method, server.url + path, data=data, headers=headers, timeout=10)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert message in response.json()["error"]
    assert set(response.json()) == {"error"}
    ok = requests.post(server.url + PREDICT, json={"features": ROW}, timeout=10)
    assert ok.status_code == 200


def test_binary_infer_with_nan_bytes_is_refused(server: LiveServer) -> None:
    x = np.full((1, N_FEATURES), np.nan, dtype="<f4").tobytes()
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, N_FEATURES],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": len(x)},
                }
            ]
        }
    ).encode()
    response = requests.post(
        server.url + INFER,
        data=header + x,
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=10,
    )
    assert response.status_code == 400
    assert "values must be finite numbers" in response.json()["error"]


def test_a_body_much_larger_than_the_limit_is_answered_413(server: LiveServer) -> None:
    """Over a raw socket: the server answers 413 without reading a huge body first."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(
            f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: {10**9}\r\n\r\n".encode()
            + b"{" * 1024
        )
        conn.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 413")
    assert b'"error"' in reply and b"the limit is" in reply


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (b"GET /v2 HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400, "Invalid HTTP Header"),
        (b"GARBAGE\r\n\r\n", 400, "Invalid Request Line"),
        (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}", 400, "Header"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "Request Line"),
    ],
    ids=["header-without-colon", "request-line", "content-length-not-a-number", "uri-too-long"],
)
def test_malformed_http_is_refused_in_json_not_gunicorns_html(
    server: LiveServer, request_bytes: bytes, status: int, message: str
) -> None:
    """gunicorn refuses these before the app sees them; the answer is still `{"error": ...}`."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
        conn.sendall(request_bytes)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status}".encode()), head
    assert b"Content-Type: application/json" in head
    assert message in json.loads(body)["error"]
    assert (
        requests.post(server.url + PREDICT, json={"features": ROW}, timeout=10).status_code == 200
    )
