"""The simple JSON API against a real `bnserve serve` (gunicorn, 2 workers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests

from bnserve.service.runtime import softmax
from tests.service.support import (
    FEATURE_NAMES,
    LABELS,
    MAX_BATCH,
    N_FEATURES,
    LiveServer,
    reference_run,
)

RNG = np.random.default_rng(42)
X = RNG.normal(size=(5, N_FEATURES)).astype(np.float32)


def _post(server: LiveServer, path: str, body: dict) -> dict:
    response = requests.post(server.url + path, json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    return response.json()


def _probabilities(answer: dict) -> np.ndarray:
    return np.array([answer["probabilities"][label] for label in LABELS], dtype=np.float32)


def test_features_list_matches_onnxruntime_on_the_default_version(
    server: LiveServer, model_repo: Path
) -> None:
    expected = reference_run(model_repo / "clf" / "10" / "model.onnx", X)
    for row, probs in zip(X, expected, strict=True):
        answer = _post(server, "/predict", {"features": row.tolist()})
        np.testing.assert_allclose(_probabilities(answer), probs, rtol=1e-6, atol=1e-9)
        best = int(np.argmax(probs))
        assert answer["class_index"] == best
        assert answer["label"] == LABELS[best]
        assert (answer["model"], answer["version"]) == ("clf", "10")


def test_features_by_name_in_any_order_equal_the_list(server: LiveServer) -> None:
    row = X[0].tolist()
    by_name = dict(reversed(list(zip(FEATURE_NAMES, row, strict=True))))
    assert _post(server, "/predict", {"features": by_name}) == _post(
        server, "/predict", {"features": row}
    )


def test_top_k_keeps_the_k_most_probable_best_first(server: LiveServer, model_repo: Path) -> None:
    probs = reference_run(model_repo / "clf" / "10" / "model.onnx", X[1:2])[0]
    answer = _post(server, "/predict", {"features": X[1].tolist(), "top_k": 2})
    order = np.argsort(-probs)[:2]
    assert list(answer["probabilities"]) == [LABELS[j] for j in order]
    assert answer["class_index"] == order[0]


def test_instances_answer_one_prediction_per_row(server: LiveServer, model_repo: Path) -> None:
    expected = reference_run(model_repo / "clf" / "10" / "model.onnx", X)
    answer = _post(server, "/predict", {"instances": X.tolist()})
    got = np.array([_probabilities(p) for p in answer["predictions"]])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("version", ["1", "2", "10"])
def test_a_chosen_version_answers_with_its_own_weights(
    server: LiveServer, model_repo: Path, version: str
) -> None:
    expected = reference_run(model_repo / "clf" / version / "model.onnx", X)
    answer = _post(server, f"/models/clf/versions/{version}/predict", {"instances": X.tolist()})
    got = np.array([_probabilities(p) for p in answer["predictions"]])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert {p["version"] for p in answer["predictions"]} == {version}


def test_other_model_of_the_repository_gets_softmax_of_its_logits(
    server: LiveServer, model_repo: Path
) -> None:
    x = RNG.normal(size=(3, 5)).astype(np.float32)
    logits = reference_run(model_repo / "foreign" / "1" / "model.onnx", x)
    answer = _post(server, "/models/foreign/predict", {"instances": x.tolist()})
    got = np.array([[p["probabilities"][str(j)] for j in range(4)] for p in answer["predictions"]])
    np.testing.assert_allclose(got, softmax(logits), rtol=1e-5, atol=1e-9)
    assert [p["label"] for p in answer["predictions"]] == [str(i) for i in logits.argmax(axis=1)]


def test_get_predict_explains_the_body(server: LiveServer) -> None:
    response = requests.get(server.url + "/predict", timeout=10)
    assert response.status_code == 200
    doc = response.json()
    assert doc["n_features"] == N_FEATURES
    assert doc["feature_names"] == FEATURE_NAMES
    assert doc["labels"] == LABELS
    assert doc["max_batch"] == MAX_BATCH
    assert "instances" in doc["usage"] and "top_k" in doc["usage"]


@pytest.mark.parametrize(
    "path", ["/predict", "/models/clf/predict", "/models/clf/versions/2/predict"]
)
def test_head_predict_answers_like_get(server: LiveServer, path: str) -> None:
    get = requests.get(server.url + path, timeout=10)
    head = requests.head(server.url + path, timeout=10)
    assert (get.status_code, head.status_code) == (200, 200)
    assert head.headers["Content-Length"] == get.headers["Content-Length"]
    assert head.content == b""


def test_health_says_what_is_loaded(server: LiveServer) -> None:
    response = requests.get(server.url + "/health", timeout=10)
    assert response.status_code == 200
    doc = response.json()
    assert doc["ready"] is True
    assert doc["models"]["clf"]["versions"] == ["1", "2", "10"]
    assert doc["models"]["clf"]["default_version"] == "10"
    assert doc["models"]["clf"]["device"] == "cpu"


def test_env_configured_single_file_server(env_server: LiveServer, foreign_file: Path) -> None:
    """BNSERVE_* variables alone configure the server: model, name, port, one worker."""
    x = RNG.normal(size=(1, 5)).astype(np.float32)
    answer = _post(env_server, "/predict", {"features": x[0].tolist()})
    assert (answer["model"], answer["version"]) == ("foreign_single", "1")
    expected = softmax(reference_run(foreign_file, x))[0]
    got = np.array([answer["probabilities"][str(j)] for j in range(4)])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
    assert len(env_server.worker_pids()) == 1
