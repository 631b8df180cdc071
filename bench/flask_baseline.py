"""The reference server for bench/serve.py: the usual minimal Flask `/predict` app.

Run as the issue describes it: `gunicorn -w 2 -k sync bench.flask_baseline:app` with
`BENCH_MODEL=model.onnx`; one onnxruntime session per worker (created lazily after the fork),
intra-op 1, `request.get_json()`, `jsonify`. No metrics, no request ids, no access log.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from flask import Flask, jsonify, request

app = Flask(__name__)
_session: ort.InferenceSession | None = None


def session() -> ort.InferenceSession:
    global _session
    if _session is None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        _session = ort.InferenceSession(
            os.environ["BENCH_MODEL"], options, providers=["CPUExecutionProvider"]
        )
    return _session


@app.post("/predict")
def predict():
    sess = session()
    x = np.asarray(request.get_json()["features"], dtype=np.float32).reshape(1, -1)
    probabilities = sess.run(None, {sess.get_inputs()[0].name: x})[0][0]
    return jsonify(
        {"class_index": int(probabilities.argmax()), "probabilities": probabilities.tolist()}
    )


@app.post("/v2/models/<name>/infer")
def infer(name: str):
    """The Open Inference Protocol's JSON infer, as a naive Flask app would write it."""
    sess = session()
    tensor = request.get_json(force=True)["inputs"][0]
    x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
    output = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    return jsonify(
        {
            "model_name": name,
            "outputs": [
                {
                    "name": sess.get_outputs()[0].name,
                    "shape": list(output.shape),
                    "datatype": "FP32",
                    "data": output.ravel().tolist(),
                }
            ],
        }
    )
