"""Operations on a live server: request ids, JSON access log, Prometheus metrics across workers,
bearer-token auth, limits, worker recycling and /openapi.json."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from openapi_spec_validator import validate

from bnserve.service.app import create_app
from bnserve.service.cli import config_from_args
from bnserve.service.gunicorn_conf import gunicorn_settings
from tests.service.production import BODY, metrics, sample, wait_for
from tests.service.support import LiveServer, build_mlp_classifier, start_server, stop_server

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """2 workers, a token file (metrics public), small limits, workers recycled every ~40."""
    tmp = tmp_path_factory.mktemp("ops")
    model = build_mlp_classifier(tmp / "m.onnx")
    token_file = tmp / "tokens"
    token_file.write_text(f"# rotated monthly\n{TOKEN}\nsecond-token-1234\n")
    live = start_server(
        [
            str(model),
            "--workers",
            "2",
            "--max-batch",
            "4",
            "--max-body-mb",
            str(2048 / 1024 / 1024),
            "--max-requests",
            "40",
            "--max-requests-jitter",
            "5",
            "--public-metrics",
        ],
        tmp / "serve.log",
        {"BNSERVE_TOKEN_FILE": str(token_file)},
    )
    yield live
    assert stop_server(live) == 0


def access_lines(server: LiveServer) -> list[dict]:
    lines = []
    for line in server.log().splitlines():
        if line.startswith('{"ts"'):
            lines.append(json.loads(line))
    return lines


def test_metrics_count_requests_of_every_worker(ops: LiveServer) -> None:
    before = metrics(ops.url)
    for _ in range(7):
        assert requests.post(ops.url + "/predict", json=BODY, headers=AUTH).status_code == 200
    for _ in range(3):
        r = requests.post(ops.url + "/predict", data=b"{not json", headers=AUTH)
        assert r.status_code == 400
    r = requests.post(
        ops.url + "/v2/models/m/infer",
        headers=AUTH,
        json={
            "inputs": [{"name": "input", "shape": [1, 8], "datatype": "FP32", "data": [0.1] * 8}]
        },
    )
    assert r.status_code == 200
    after = metrics(ops.url)

    def delta(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("bnserve_requests_total", route="/predict", method="POST", status="200") == 7
    assert delta("bnserve_requests_total", route="/predict", method="POST", status="400") == 3
    infer = "/v2/models/<name>/infer"
    assert delta("bnserve_requests_total", route=infer, method="POST", status="200") == 1
    assert delta("bnserve_request_duration_seconds_count", route="/predict") == 10
    assert delta("bnserve_inference_duration_seconds_count", model="m") == 8
    assert sample(after, "bnserve_requests_in_flight") == 1  # this scrape

    def served_by_every_worker() -> bool:
        # one info series per live worker (a worker still booting has none yet), dead ones dropped
        served = {
            dict(labels)["pid"]
            for (name, labels), value in metrics(ops.url).items()
            if name == "bnserve_model_info" and value == 1 and dict(labels)["model"] == "m"
        }
        return served == {str(p) for p in ops.worker_pids()}

    assert wait_for(served_by_every_worker, 20)
    # read after the wait: a worker that was still booting at `after` has loaded by now
    loads = sample(metrics(ops.url), "bnserve_model_loads_total", model="m", result="ok")
    assert loads >= 2


def test_request_id_is_honoured_generated_and_logged(ops: LiveServer) -> None:
    r = requests.post(ops.url + "/predict", json=BODY, headers={**AUTH, "X-Request-ID": "abc-123"})
    assert r.headers["X-Request-ID"] == "abc-123"
    r = requests.get(ops.url + "/v2", headers={**AUTH, "X-Request-ID": "req.42"})
    assert r.headers["X-Request-ID"] == "req.42"
    bad = requests.get(ops.url + "/v2", headers={**AUTH, "X-Request-ID": "no spaces <b>"})
    assert bad.headers["X-Request-ID"] not in ("", "no spaces <b>")
    ids = {requests.get(ops.url + "/v2/health/live").headers["X-Request-ID"] for _ in range(5)}
    assert len(ids) == 5
    r = requests.get(ops.url + "/nowhere", headers={**AUTH, "X-Request-ID": "lost-1"})
    assert r.status_code == 404 and r.headers["X-Request-ID"] == "lost-1"

    def logged() -> bool:
        by_id = {line["request_id"]: line for line in access_lines(ops)}
        return {"abc-123", "req.42", "lost-1"} <= set(by_id)

    assert wait_for(logged, 5)
    by_id = {line["request_id"]: line for line in access_lines(ops)}
    line = by_id["abc-123"]
    assert (line["method"], line["route"], line["status"]) == ("POST", "/predict", 200)
    assert line["duration_ms"] > 0 and line["level"] == "info" and line["bytes"] > 0
    address, _, client_port = line["peer"].rpartition(":")
    assert address == "127.0.0.1" and client_port.isdigit()  # who sent it
    assert by_id["req.42"]["route"] == "/v2"
    assert (by_id["lost-1"]["route"], by_id["lost-1"]["status"]) == ("unmatched", 404)


def test_auth_requires_a_bearer_token_except_for_health(ops: LiveServer) -> None:
    r = requests.post(ops.url + "/predict", json=BODY)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="bnserve"'
    assert "bearer token" in r.json()["error"]
    r = requests.post(ops.url + "/predict", json=BODY, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and 'error="invalid_token"' in r.headers["WWW-Authenticate"]
    r = requests.get(ops.url + "/v2/models/m", headers={"Authorization": "Basic eDp5"})
    assert r.status_code == 401
    for path in ("/v2/health/live", "/v2/health/ready", "/health", "/metrics"):
        assert requests.get(ops.url + path).status_code == 200, path
    ok = requests.post(
        ops.url + "/predict", json=BODY, headers={"Authorization": "Bearer second-token-1234"}
    )
    assert ok.status_code == 200
    assert requests.get(ops.url + "/v2/models/m", headers=AUTH).status_code == 200


def test_metrics_need_the_token_unless_public(tmp_path: Path) -> None:
    model = build_mlp_classifier(tmp_path / "m.onnx")
    tokens = tmp_path / "t"
    tokens.write_text(TOKEN + "\n")
    config = {"model": str(model), "token_file": str(tokens)}
    client = create_app(config).test_client()
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=AUTH).status_code == 200
    assert client.get("/openapi.json").status_code == 401
    public = create_app({**config, "public_metrics": True}).test_client()
    assert public.get("/metrics").status_code == 200
    assert create_app({"model": str(model)}).test_client().get("/metrics").status_code == 200


def test_an_empty_token_file_refuses_to_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.service.support import REPO_ROOT

    empty = tmp_path / "t"
    empty.write_text("# nothing\n")
    model = build_mlp_classifier(tmp_path / "m.onnx")
    done = subprocess.run(
        # --grpc-port 0: the refusal under test, whatever holds the default gRPC port
        [
            sys.executable,
            *("-m", "bnserve", "serve", str(model), "--token-file", str(empty), "--grpc-port", "0"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 2 and "no token in it" in done.stderr


def test_body_and_row_limits(ops: LiveServer) -> None:
    r = requests.post(ops.url + "/predict", data=b"[" + b"0," * 2000 + b"0]", headers=AUTH)
    assert r.status_code == 413 and "limit is 2048" in r.json()["error"]
    r = requests.post(ops.url + "/predict", json={"instances": [[0.0] * 8] * 5}, headers=AUTH)
    assert r.status_code == 413 and "at most 4 per request" in r.json()["error"]
    r = requests.post(ops.url + "/predict", json={"instances": [[0.0] * 8] * 4}, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 4


def test_workers_are_recycled_after_max_requests_without_failures(ops: LiveServer) -> None:
    first = set(ops.worker_pids())
    session_free = [
        requests.post(ops.url + "/predict", json=BODY, headers=AUTH).status_code for _ in range(100)
    ]
    assert session_free == [200] * 100
    assert wait_for(lambda: len(set(ops.worker_pids()) - first) >= 1, 20)
    assert "Autorestarting worker" in ops.log()


def test_limits_reach_gunicorn(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TOKEN_FILE", "DRAIN_SECONDS", "MAX_REQUESTS", "MAX_REQUESTS_JITTER", "TIMEOUT"):
        monkeypatch.delenv(f"BNSERVE_{name}", raising=False)
    config = config_from_args(["m.onnx", "--timeout", "7", "--max-requests", "1000"])
    settings = gunicorn_settings(config)
    assert (settings["timeout"], settings["max_requests"], settings["max_requests_jitter"]) == (
        7,
        1000,
        100,
    )
    monkeypatch.setenv("BNSERVE_DRAIN_SECONDS", "5")
    monkeypatch.setenv("BNSERVE_TOKEN_FILE", "/run/secrets/token")
    monkeypatch.setenv("BNSERVE_LOG_LEVEL", "warning")
    config = config_from_args(["m.onnx"])
    assert (config.drain_seconds, config.token_file, config.log_level) == (
        5.0,
        "/run/secrets/token",
        "warning",
    )
    config = config_from_args(["m.onnx", "--drain-seconds", "0", "--token-file", "t"])
    assert (config.drain_seconds, config.token_file) == (0.0, "t")


def test_log_level_warning_turns_the_access_log_off(tmp_path: Path) -> None:
    model = build_mlp_classifier(tmp_path / "m.onnx")
    quiet = create_app({"model": str(model), "log_level": "warning"})
    assert quiet.wsgi_app.access_log is None
    assert create_app({"model": str(model)}).wsgi_app.access_log is not None
    off = create_app({"model": str(model), "access_log": False})
    assert off.wsgi_app.access_log is None


def test_openapi_is_valid_and_describes_every_route(ops: LiveServer) -> None:
    document = requests.get(ops.url + "/openapi.json", headers=AUTH).json()
    validate(document)  # openapi-spec-validator, OpenAPI 3.1
    assert document["openapi"] == "3.1.0"
    app = create_app({"model": str(Path(ops.log_path).parent / "m.onnx")})
    rules = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            rules.add((path, method.lower()))
    rules |= {("/metrics", "get"), ("/openapi.json", "get")}
    documented = {(p, m) for p, ops_ in document["paths"].items() for m in ops_}
    assert documented == rules
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/v2/health/ready"]["get"]["security"] == []
