"""The Open Inference Protocol with the real `tritonclient.http` client (and raw requests)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from tests.service.support import LABELS, N_FEATURES, LiveServer, reference_run

X = np.random.default_rng(7).normal(size=(4, N_FEATURES)).astype(np.float32)


@pytest.fixture(scope="module")
def client(server: LiveServer):
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield client
    client.close()


def _input(x: np.ndarray, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def test_health_and_server_metadata(client) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    metadata = client.get_server_metadata()
    assert metadata["name"] == "bnserve"
    assert set(metadata["extensions"]) >= {"binary_tensor_data", "classification"}


def test_model_readiness_and_versions(client) -> None:
    assert client.is_model_ready("clf")
    assert client.is_model_ready("clf", "2")
    assert not client.is_model_ready("clf", "7")
    assert not client.is_model_ready("nope")


def test_model_metadata_describes_the_classifier(client) -> None:
    metadata = client.get_model_metadata("clf")
    assert metadata["name"] == "clf"
    assert metadata["versions"] == ["1", "2", "10"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, N_FEATURES]}]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "logits"]
    assert metadata["outputs"][0]["shape"] == [-1, 3]
    params = metadata["parameters"]
    assert params["labels"] == LABELS
    assert params["device"] == "cpu"
    assert params["fold_report"] == {"folded": 2, "max_abs_diff": 1.2e-7}
    assert params["parity_report"]["passed"] is True
    assert client.get_model_metadata("clf", "2")["name"] == "clf"


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_equals_onnxruntime(
    client, model_repo: Path, binary_in: bool, binary_out: bool
) -> None:
    outputs = [
        httpclient.InferRequestedOutput("probabilities", binary_data=binary_out),
        httpclient.InferRequestedOutput("logits", binary_data=binary_out),
    ]
    result = client.infer("clf", [_input(X, binary_in)], outputs=outputs, request_id="req-1")
    path = model_repo / "clf" / "10" / "model.onnx"
    np.testing.assert_allclose(
        result.as_numpy("probabilities"), reference_run(path, X), rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(
        result.as_numpy("logits"), reference_run(path, X, "logits"), rtol=1e-6
    )
    response = result.get_response()
    assert response["id"] == "req-1"
    assert (response["model_name"], response["model_version"]) == ("clf", "10")
    assert ("parameters" in response["outputs"][0]) == binary_out


def test_infer_with_client_defaults_returns_every_output_in_binary(
    client, model_repo: Path
) -> None:
    result = client.infer("clf", [_input(X, True)])  # no outputs named: binary_data_output
    assert {o["name"] for o in result.get_response()["outputs"]} == {"probabilities", "logits"}
    expected = reference_run(model_repo / "clf" / "10" / "model.onnx", X)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-6, atol=1e-9)


def test_an_empty_outputs_list_returns_every_output(server: LiveServer) -> None:
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": [1, N_FEATURES],
                "datatype": "FP32",
                "data": [0] * N_FEATURES,
            }
        ],
        "outputs": [],
    }
    response = requests.post(f"{server.url}/v2/models/clf/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["probabilities", "logits"]


@pytest.mark.parametrize("version", ["1", "2"])
def test_infer_a_chosen_version(client, model_repo: Path, version: str) -> None:
    result = client.infer("clf", [_input(X, True)], model_version=version)
    expected = reference_run(model_repo / "clf" / version / "model.onnx", X)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=1e-6, atol=1e-9)
    assert result.get_response()["model_version"] == version


@pytest.mark.parametrize("binary_out", [True, False])
def test_classification_extension(client, model_repo: Path, binary_out: bool) -> None:
    output = httpclient.InferRequestedOutput("probabilities", binary_data=binary_out, class_count=2)
    result = client.infer("clf", [_input(X, True)], outputs=[output])
    got = result.as_numpy("probabilities")
    assert got.shape == (4, 2)
    probs = reference_run(model_repo / "clf" / "10" / "model.onnx", X)
    for row, strings in zip(probs, got, strict=True):
        order = np.argsort(-row, kind="stable")[:2]
        parts = [(s.decode() if isinstance(s, bytes) else s).split(":") for s in strings]
        assert [int(p[1]) for p in parts] == order.tolist()
        assert [p[2] for p in parts] == [LABELS[j] for j in order]
        assert [np.float32(p[0]) for p in parts] == row[order].tolist()  # exact float32
        assert all(len(p[0]) <= 14 for p in parts)  # shortest float32 form, not float64 repr


def test_classification_without_labels_is_score_and_index(client) -> None:
    x = np.ones((1, 5), dtype=np.float32)
    tensor = httpclient.InferInput("x", [1, 5], "FP32")
    tensor.set_data_from_numpy(x)
    output = httpclient.InferRequestedOutput("scores", class_count=4)
    strings = client.infer("foreign", [tensor], outputs=[output]).as_numpy("scores")[0]
    assert all(len(s.decode().split(":")) == 2 for s in strings)


def test_errors_reach_tritonclient_as_messages(client) -> None:
    with pytest.raises(InferenceServerException, match="expected shape \\[batch, 8\\]") as info:
        client.infer("clf", [_input(X[:, :7].copy(), True)])
    assert info.value.status() == "400"
    with pytest.raises(InferenceServerException, match="unknown model 'nope'"):
        client.get_model_metadata("nope")


def test_raw_json_infer_with_nested_data_int_datatype_and_gzip(
    server: LiveServer, model_repo: Path
) -> None:
    ints = np.arange(2 * N_FEATURES).reshape(2, N_FEATURES) % 5 - 2
    body = {
        "id": "abc",
        "inputs": [
            {"name": "input", "shape": [2, N_FEATURES], "datatype": "INT64", "data": ints.tolist()}
        ],
        "outputs": [{"name": "probabilities"}],
    }
    response = requests.post(f"{server.url}/v2/models/clf/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text
    doc = response.json()
    assert doc["id"] == "abc"
    out = doc["outputs"][0]
    assert (out["name"], out["datatype"], out["shape"]) == ("probabilities", "FP32", [2, 3])
    expected = reference_run(model_repo / "clf" / "10" / "model.onnx", ints.astype(np.float32))
    np.testing.assert_allclose(np.array(out["data"], np.float32).reshape(2, 3), expected, rtol=1e-6)

    import orjson

    compressed = gzip.compress(orjson.dumps(body))
    zipped = requests.post(
        f"{server.url}/v2/models/clf/versions/10/infer",
        data=compressed,
        headers={"Content-Encoding": "gzip"},
        timeout=10,
    )
    assert zipped.status_code == 200, zipped.text
    assert zipped.json()["outputs"] == doc["outputs"]
