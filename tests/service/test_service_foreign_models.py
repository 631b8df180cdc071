"""ONNX classifiers from other tools: a batch size fixed at export, and a predicted-label output
next to the scores (sklearn-onnx with zipmap=False). Served in-process through the full app."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnserve.service.app import create_app
from bnserve.service.offline import score
from bnserve.service.runtime import ModelRuntime, softmax
from tests.service.support import reference_run, v2_request

W = np.random.default_rng(3).normal(size=(5, 3)).astype(np.float32)
X = np.random.default_rng(4).normal(size=(5, 5)).astype(np.float32)


def _save(nodes: list, batch, outputs: list, path: Path) -> Path:
    graph = helper.make_graph(
        nodes,
        "foreign",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 5])],
        outputs,
        [numpy_helper.from_array(W, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def fixed_batch_model(path: Path, batch: int) -> Path:
    """Exported with a fixed batch size (a common torch.onnx.export default without dynamic axes)."""
    return _save(
        [helper.make_node("MatMul", ["x", "W"], ["logits"])],
        batch,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 3])],
        path,
    )


def label_and_scores_model(path: Path) -> Path:
    """sklearn-onnx's layout: an int64 label [N] and float scores [N, C], neither 'probabilities'."""
    return _save(
        [
            helper.make_node("MatMul", ["x", "W"], ["z"]),
            helper.make_node("Softmax", ["z"], ["output_probability"], axis=1),
            helper.make_node("ArgMax", ["z"], ["output_label"], axis=1, keepdims=0),
        ],
        "N",
        [
            helper.make_tensor_value_info("output_label", TensorProto.INT64, ["N"]),
            helper.make_tensor_value_info("output_probability", TensorProto.FLOAT, ["N", 3]),
        ],
        path,
    )


def _infer(client, name: str, rows: np.ndarray, **extra) -> dict:
    body = v2_request(rows, "x", **extra)
    return client.post(f"/v2/models/{name}/infer", json=body)


@pytest.mark.parametrize("batch", [1, 2])
def test_a_model_exported_with_a_fixed_batch_serves_any_batch(tmp_path: Path, batch: int) -> None:
    path = fixed_batch_model(tmp_path / "fixed.onnx", batch)
    expected = X @ W  # what the graph computes, row by row
    runtime = ModelRuntime.load(path, "fixed", 1)
    np.testing.assert_allclose(runtime.probabilities(X), softmax(expected), rtol=1e-5)
    np.testing.assert_allclose(score(runtime, X, batch_size=4), softmax(expected), rtol=1e-5)

    client = create_app({"model": str(path)}).test_client()
    answer = client.post("/predict", json={"instances": X[:3].tolist()})
    assert answer.status_code == 200, answer.get_json()
    got = [[p["probabilities"][str(j)] for j in range(3)] for p in answer.get_json()["predictions"]]
    np.testing.assert_allclose(got, softmax(expected[:3]), rtol=1e-5)

    response = _infer(client, "fixed", X[:3])
    assert response.status_code == 200, response.get_json()
    out = response.get_json()["outputs"][0]
    assert out["shape"] == [3, 3]
    np.testing.assert_allclose(np.reshape(out["data"], (3, 3)), expected[:3], rtol=1e-5)
    outputs = client.get("/v2/models/fixed").get_json()["outputs"]
    assert outputs == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]


def test_a_label_output_next_to_the_scores_is_served(tmp_path: Path) -> None:
    path = label_and_scores_model(tmp_path / "skl.onnx")
    runtime = ModelRuntime.load(path, "skl", 1)
    assert runtime.info.score_output == "output_probability"
    assert runtime.info.output_kind == "probabilities"

    client = create_app({"model": str(path)}).test_client()
    answer = client.post("/predict", json={"features": X[0].tolist()}).get_json()
    expected = reference_run(path, X[:2], "output_probability")
    assert answer["class_index"] == int(expected[0].argmax())

    doc = _infer(client, "skl", X[:2]).get_json()
    by_name = {o["name"]: o for o in doc["outputs"]}
    assert by_name["output_label"]["datatype"] == "INT64"
    assert by_name["output_label"]["data"] == expected.argmax(axis=1).tolist()
    np.testing.assert_allclose(
        np.reshape(by_name["output_probability"]["data"], (2, 3)), expected, rtol=1e-6
    )
    binary = _infer(client, "skl", X[:2], parameters={"binary_data_output": True})
    assert binary.status_code == 200
    wrong = _infer(
        client,
        "skl",
        X[:2],
        outputs=[{"name": "output_label", "parameters": {"classification": 1}}],
    )
    assert wrong.status_code == 400
    assert "needs a [batch, classes] output" in wrong.get_json()["error"]
    meta = client.get("/v2/models/skl").get_json()
    assert meta["outputs"][0] == {"name": "output_label", "datatype": "INT64", "shape": [-1]}
