"""`bnserve fold` through the real CLI: success with --report and inspect, refusals (exit 2) and a
failed parity gate (exit 3), never a traceback or a file left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from bnserve.cli import main
from bnserve.converter import fold as fold_math
from tests.conftest import run_cli
from tests.converter.test_foreign_graphs import F, H, K, arr, bn_inits, bn_node, make_model


def _model(tmp_path: Path, **bn_attrs) -> Path:
    inits = {"W": arr(H, F), "b": arr(H), **bn_inits("bn", H), "W2": arr(K, H), "b2": arr(K)}
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["z"], name="fc", transB=1),
        bn_node("bn", "z", "n", **bn_attrs),
        helper.make_node("Relu", ["n"], ["a"]),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["l"], name="out", transB=1),
        helper.make_node("Softmax", ["l"], ["y"], axis=1),
    ]
    path = tmp_path / "in.onnx"
    onnx.save(make_model(nodes, inits, opset=15), str(path))
    return path


def _refused(tmp_path: Path, *args: str, code: int = 2, match: str = "") -> str:
    before = sorted(os.listdir(tmp_path))
    r = run_cli("fold", *args)
    assert r.returncode == code, r.stderr
    assert "bnserve fold: error:" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert match in r.stderr, r.stderr
    assert sorted(os.listdir(tmp_path)) == before  # no output, no report, no temp file
    return r.stderr


def test_fold_writes_model_and_report_and_inspect_shows_it(tmp_path):
    src = _model(tmp_path)
    out, rep = tmp_path / "out.onnx", tmp_path / "report.json"
    r = run_cli("fold", str(src), "-o", str(out), "--report", str(rep))
    assert r.returncode == 0, r.stderr
    assert "1 of 1 BatchNormalization folded, 5 -> 4 nodes" in r.stdout
    report = json.loads(rep.read_text())
    assert report["fold"]["batchnorms"][0]["status"] == "folded"
    assert report["fold"]["operators_after"] == {"Gemm": 2, "Relu": 1, "Softmax": 1}
    assert report["parity"]["passed"] and report["parity"]["max_abs_diff"] < 1e-5
    shown = run_cli("inspect", str(out))
    assert shown.returncode == 0, shown.stderr
    assert "fold report (bnserve fold): 1 of 1 BatchNormalization folded" in shown.stdout
    assert "bn (BatchNormalization): folded into the preceding Gemm 'fc'" in shown.stdout
    assert "parity report: passed" in shown.stdout
    assert sorted(os.listdir(tmp_path)) == ["in.onnx", "out.onnx", "report.json"]


def test_same_input_gives_identical_bytes(tmp_path):
    src = _model(tmp_path)
    assert main(["fold", str(src), "-o", str(tmp_path / "a.onnx"), "-q"]) == 0
    assert main(["fold", str(src), "-o", str(tmp_path / "b.onnx"), "-q"]) == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_refuses_training_mode_bn(tmp_path):
    src = _model(tmp_path, training_mode=1)
    _refused(tmp_path, str(src), "-o", str(tmp_path / "o.onnx"), match="training mode")


def test_refuses_negative_variance(tmp_path):
    src = _model(tmp_path)
    m = onnx.load(str(src))
    var = next(t for t in m.graph.initializer if t.name == "bn.var")
    var.CopyFrom(onnx.numpy_helper.from_array(-np.ones(H, np.float32), "bn.var"))
    onnx.save(m, str(src))
    _refused(tmp_path, str(src), "-o", str(tmp_path / "o.onnx"), match="var + eps must be positive")


def test_refuses_unreadable_and_non_onnx_files(tmp_path):
    (tmp_path / "text.onnx").write_text("hello, this is not a protobuf")
    (tmp_path / "empty.onnx").write_bytes(b"")
    out = str(tmp_path / "o.onnx")
    _refused(tmp_path, str(tmp_path / "missing.onnx"), "-o", out, match="no such file")
    _refused(tmp_path, str(tmp_path / "text.onnx"), "-o", out, match="text.onnx")
    _refused(tmp_path, str(tmp_path / "empty.onnx"), "-o", out, match="not an ONNX model")
    _refused(tmp_path, str(tmp_path), "-o", out, match="is a directory")


def test_refuses_output_directory_and_bad_options(tmp_path):
    src = _model(tmp_path)
    (tmp_path / "dir").mkdir()
    _refused(tmp_path, str(src), "-o", str(tmp_path / "dir"), match="is a directory")
    _refused(tmp_path, str(src), "-o", str(tmp_path / "o.onnx"), "--atol", "-1", match="--atol")
    (tmp_path / "bad.npy").write_text("nope")
    _refused(
        tmp_path, str(src), "-o", str(tmp_path / "o.onnx"), "--probe", str(tmp_path / "bad.npy")
    )


def test_failed_parity_gate_exits_3_and_writes_no_model(tmp_path, monkeypatch, capsys):
    src = _model(tmp_path)

    def wrong(W, b, s, t):  # forgets the shift t
        return W * s[None, :], s * (0 if b is None else b)

    monkeypatch.setattr(fold_math, "fold_affine_into_preceding_linear", wrong)
    rc = main(["fold", str(src), "-o", str(tmp_path / "o.onnx")])
    assert rc == 3
    err = capsys.readouterr().err
    assert "parity gate failed" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["in.onnx"]


def test_fold_refuses_to_overwrite_its_input(tmp_path):
    src = _model(tmp_path)
    before = src.read_bytes()
    for extra in ([], ["--report", str(src)]):
        out = src if not extra else tmp_path / "out.onnx"
        result = run_cli("fold", str(src), "-o", str(out), *extra)
        assert result.returncode == 2 and "is the input model itself" in result.stderr
        assert src.read_bytes() == before
        assert not (tmp_path / "out.onnx").exists()


def test_fold_profile_from_training_data_or_a_profile_file(tmp_path):
    """--profile: the folded foreign model carries the training data's profile and feature
    names, and the service flags its out-of-range inputs as for a model bnserve trained."""
    from bnserve.models.data import load_dataset
    from bnserve.models.profile import profile_of_features
    from bnserve.service.app import create_app

    src = _model(tmp_path)  # 4 float inputs, like iris
    out = tmp_path / "out.onnx"
    r = run_cli("fold", str(src), "-o", str(out), "--profile", "sklearn:iris", "-q")
    assert r.returncode == 0, r.stderr
    metadata = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    iris = load_dataset("sklearn:iris")
    assert json.loads(metadata["bnserve.profile"]) == json.loads(
        json.dumps(profile_of_features(iris.X, list(iris.feature_names)))
    )
    assert json.loads(metadata["bnserve.feature_names"]) == list(iris.feature_names)
    inspected = tmp_path / "inspected.json"
    inspected.write_text(run_cli("inspect", "--json", str(out)).stdout)
    again = tmp_path / "again.onnx"  # the profile of one model given to another
    assert run_cli("fold", str(src), "-o", str(again), "--profile", str(inspected)).returncode == 0
    copied = {p.key: p.value for p in onnx.load(str(again)).metadata_props}
    assert json.loads(copied["bnserve.profile"]) == json.loads(metadata["bnserve.profile"])

    client = create_app({"model": str(out)}).test_client()
    far = [100.0, 3.0, 4.0, 1.0]
    (warning,) = client.post("/predict", json={"features": far}).get_json()["warnings"]
    assert warning["input"] == "sepal length (cm)" and warning["value"] == 100.0
    assert (
        "warnings"
        not in client.post("/predict", json={"features": [5.1, 3.5, 1.4, 0.2]}).get_json()
    )


def test_fold_profile_refusals(tmp_path):
    src = _model(tmp_path)
    out = str(tmp_path / "out.onnx")
    _refused(tmp_path, str(src), "-o", out, "--profile", "sklearn:wine",
             match="describes 13 inputs, the model takes 4 features")  # fmt: skip
    bad = tmp_path / "bad.json"
    bad.write_text('{"inputs": [{"name": "a", "min": 0}]}')
    _refused(tmp_path, str(src), "-o", out, "--profile", str(bad),
             match="input 0 lacks count, mean, std, max, quantiles")  # fmt: skip
    text = tmp_path / "text.csv"
    text.write_text("a,b,c,d,label\n" + "".join(f"{i},x{i % 3},1,2,{i % 2}\n" for i in range(30)))
    _refused(tmp_path, str(src), "-o", out, "--profile", str(text), match="reads numbers only")
