"""The whole pipeline through the real commands: train -> convert -> serve -> HTTP, and the answers
compared with the checkpoint's own float64 evaluation and an in-process onnxruntime run."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import requests
import tritonclient.http as triton

from bnserve.models.checkpoint import load_checkpoint
from bnserve.models.data import load_dataset
from tests.conftest import run_cli
from tests.service.support import reference_run, start_server, stop_server


@pytest.fixture(scope="module")
def pipeline(iris_run, tmp_path_factory):
    """iris checkpoint (population statistics) -> folded ONNX -> a live 2-worker server."""
    tmp = tmp_path_factory.mktemp("e2e")
    model = tmp / "iris.onnx"
    result = run_cli("convert", str(iris_run / "checkpoint.npz"), "-o", str(model))
    assert result.returncode == 0, result.stderr
    server = start_server([str(model), "--workers", "2"], tmp / "serve.log", {})
    yield load_checkpoint(iris_run / "checkpoint.npz"), model, server
    stop_server(server)


def test_simple_api_matches_checkpoint_and_onnxruntime(pipeline):
    ckpt, model, server = pipeline
    data = load_dataset("sklearn:iris")
    rows = data.X[::10]
    expected = ckpt.predict_proba(rows)  # float64, unfolded, the checkpoint's default statistics
    in_process = reference_run(model, rows, "probabilities")
    for i, row in enumerate(rows):
        by_name = dict(zip(ckpt.feature_names, row.tolist(), strict=True))
        for features in (row.tolist(), by_name):
            answer = requests.post(
                f"{server.url}/predict", json={"features": features}, timeout=10
            ).json()
            probs = np.array([answer["probabilities"][c] for c in ckpt.class_names])
            np.testing.assert_allclose(probs, expected[i], atol=1e-5)
            np.testing.assert_allclose(probs, in_process[i], atol=1e-7)
            assert answer["label"] == ckpt.class_names[int(expected[i].argmax())]
            assert answer["model"] == "iris"
    batch = requests.post(
        f"{server.url}/predict", json={"instances": rows.tolist()}, timeout=10
    ).json()
    labels = [p["label"] for p in batch["predictions"]]
    assert labels == [ckpt.class_names[k] for k in expected.argmax(1)]


def test_v2_with_tritonclient_matches_checkpoint(pipeline):
    ckpt, _, server = pipeline
    rows = load_dataset("sklearn:iris").X[1::7].astype(np.float32)
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_model_ready("iris")
    meta = client.get_model_metadata("iris")
    assert meta["platform"] == "onnxruntime_onnx"
    inp = triton.InferInput("input", list(rows.shape), "FP32")
    inp.set_data_from_numpy(rows)
    probs = client.infer("iris", [inp]).as_numpy("probabilities")
    np.testing.assert_allclose(probs, ckpt.predict_proba(rows.astype(np.float64)), atol=1e-5)


def test_predict_command_matches_checkpoint(pipeline, tmp_path):
    ckpt, model, _ = pipeline
    data = load_dataset("sklearn:iris")
    src = tmp_path / "rows.csv"
    with open(src, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ckpt.feature_names)
        w.writerows(data.X[:20].tolist())
    out = tmp_path / "scored.csv"
    result = run_cli("predict", str(model), str(src), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.stat().st_mode & 0o044 == 0o044  # umask permissions, not mkstemp's 0600
    with open(out) as f:
        scored = list(csv.DictReader(f))
    expected = ckpt.predict_proba(data.X[:20])
    assert [r["label"] for r in scored] == [ckpt.class_names[k] for k in expected.argmax(1)]


def test_up_trains_converts_serves_and_stops_quickly(tmp_path):
    """`bnserve up` on a fresh folder: train, convert, serve; SIGTERM stops it within seconds."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.service.support import REPO_ROOT, free_port, python_path

    port = free_port()
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "bnserve", "up", "--data", "sklearn:iris", "--dir", str(tmp_path / "m"), "--port", str(port), "--grpc-port", "0", "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": python_path()},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            try:
                if (
                    requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code
                    == 200
                ):
                    break
            except requests.RequestException:
                time.sleep(0.3)
        answer = requests.post(
            f"http://127.0.0.1:{port}/predict", json={"features": [5.1, 3.5, 1.4, 0.2]}, timeout=5
        )
        assert answer.status_code == 200 and answer.json()["label"] == "setosa"
        assert (tmp_path / "m" / "checkpoint.npz").exists() and (
            tmp_path / "m" / "model.onnx"
        ).exists()
        printed = (tmp_path / "up.log").read_text()
        assert f"http://127.0.0.1:{port}" in printed and "curl -s" in printed
    finally:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert time.monotonic() - started < 15
