"""The protocols users already run, against the live server (2 gunicorn workers): KServe V1
with `requests`, the Triton-style model configuration through `tritonclient.http`, and W3C
trace context (accepted, continued in the response, its trace id in the access log)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient

from tests.service.support import LABELS, N_FEATURES, reference_run

X = np.random.default_rng(7).normal(size=(3, N_FEATURES)).astype(np.float32)


def test_kserve_v1_status_and_predict(server, model_repo) -> None:
    status = requests.get(server.url + "/v1/models/clf", timeout=10)
    assert status.status_code == 200 and status.json() == {"name": "clf", "ready": True}
    assert requests.get(server.url + "/v1/models/nope", timeout=10).status_code == 404
    answer = requests.post(
        server.url + "/v1/models/clf:predict", json={"instances": X.tolist()}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    expected = reference_run(model_repo / "clf" / "10" / "model.onnx", X)
    assert answer.json() == {"predictions": [LABELS[i] for i in expected.argmax(axis=1)]}
    probs = requests.post(
        server.url + "/v1/models/clf:predict",
        json={"instances": X.tolist(), "parameters": {"probabilities": True}},
        timeout=10,
    ).json()["predictions"]
    np.testing.assert_allclose(probs, expected, rtol=1e-6)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": [[0.0] * N_FEATURES]}, 400, "expected a JSON object with 'instances'"),
        ({"instances": [[0.0] * 3]}, 400, f"expected {N_FEATURES} features, got 3"),
        ({"instances": [[0.0] * N_FEATURES], "extra": 1}, 400, "unknown fields"),
    ],
)
def test_kserve_v1_errors_have_the_one_json_shape(server, body, status, message) -> None:
    answer = requests.post(server.url + "/v1/models/clf:predict", json=body, timeout=10)
    assert answer.status_code == status and message in answer.json()["error"]
    assert set(answer.json()) == {"error"}


def test_triton_model_config_through_tritonclient(server) -> None:
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    config = client.get_model_config("clf")
    assert config["name"] == "clf" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] > 0
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [N_FEATURES]}]
    outputs = {o["name"]: o for o in config["output"]}
    assert outputs["probabilities"]["dims"] == [len(LABELS)]
    assert json.loads(config["parameters"]["labels"]["string_value"]) == LABELS
    versioned = client.get_model_config("clf", model_version="2")
    assert versioned["input"] == config["input"]


def test_traceparent_is_continued_and_logged(server) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    header = f"00-{trace}-00f067aa0ba902b7-01"
    answer = requests.get(
        server.url + "/v2/models/clf", headers={"traceparent": header}, timeout=10
    )
    echoed = answer.headers["traceparent"]
    version, trace_id, span, flags = echoed.split("-")
    assert (version, trace_id, flags) == ("00", trace, "01")
    assert span != "00f067aa0ba902b7" and len(span) == 16
    for bad in (
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",
        "junk",
        f"00-{trace.upper()}-00f067aa0ba902b7-01",
    ):
        ignored = requests.get(
            server.url + "/v2/models/clf", headers={"traceparent": bad}, timeout=10
        )
        assert ignored.status_code == 200 and "traceparent" not in ignored.headers
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        # search the text: other workers' lines may be half written while we read
        if f'"trace_id":"{trace}"' in server.log():
            break
        time.sleep(0.1)
    else:
        pytest.fail("the access log has no line with the trace id")


def _wait_for(url: str, status: int, seconds: float = 30) -> int:
    deadline = time.monotonic() + seconds
    while True:
        got = requests.get(url, timeout=10).status_code
        if got == status or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_a_polled_repository_is_served_as_it_is(tmp_path) -> None:
    import shutil

    from tests.service.support import build_mlp_classifier, start_server, stop_server

    repo = tmp_path / "repo"
    build_mlp_classifier(repo / "first" / "1" / "model.onnx", seed=1)
    args = [str(repo), "--workers", "2", "--model-control", "poll"]
    live = start_server([*args, "--repository-poll-secs", "0.5"], tmp_path / "serve.log", {})
    try:
        new = repo / "second" / "1" / "model.onnx"
        build_mlp_classifier(new, seed=2)
        assert _wait_for(live.url + "/v2/models/second/ready", 200) == 200, live.log()
        x = np.zeros((1, N_FEATURES), np.float32)
        body = {"inputs": [{"name": "input", "shape": [1, N_FEATURES], "datatype": "FP32",
                            "data": x.ravel().tolist()}]}  # fmt: skip
        answer = requests.post(live.url + "/v2/models/second/infer", json=body, timeout=10)
        np.testing.assert_allclose(answer.json()["outputs"][0]["data"], reference_run(new, x)[0],
                                   rtol=1e-6)  # fmt: skip
        shutil.rmtree(repo / "first")
        assert _wait_for(live.url + "/v2/models/first/ready", 404) == 404, live.log()
        assert requests.get(live.url + "/v2/models/second/ready", timeout=10).status_code == 200
        refused = requests.post(live.url + "/v2/repository/models/second/unload", timeout=10)
        assert refused.status_code == 403  # poll serves the repository as it is
    finally:
        stop_server(live)


def test_opentelemetry_spans_join_the_callers_trace(tmp_path, monkeypatch) -> None:
    """With the otel extra: a server span per request, a child of the caller's traceparent, and
    an onnxruntime.run span under it (exported here to memory instead of OTLP)."""
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from bnserve.service import tracing
    from bnserve.service.app import create_app
    from tests.service.support import build_mlp_classifier

    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    monkeypatch.setattr(tracing, "ACTIVE", provider.get_tracer("test"))
    client = create_app({"model": str(build_mlp_classifier(tmp_path / "m.onnx"))}).test_client()
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    answer = client.post(
        "/predict",
        json={"features": [0.0] * N_FEATURES},
        headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"},
    )
    assert answer.status_code == 200
    spans = {s.name: s for s in exported.get_finished_spans()}
    server, run = spans["POST /predict"], spans["onnxruntime.run"]
    assert f"{server.context.trace_id:032x}" == trace
    assert f"{server.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert run.parent.span_id == server.context.span_id
    assert server.attributes["http.response.status_code"] == 200
    assert answer.headers["traceparent"] == f"00-{trace}-{server.context.span_id:016x}-01"


def test_tracing_is_off_without_otel_variables() -> None:
    from bnserve.service.tracing import tracer_from_env

    assert tracer_from_env({}) is None
    assert tracer_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
