"""Output paths that cannot be written (exit 2, no traceback, nothing left behind, and for `fold` no
model without its report) and half-precision models in `bnserve fold`."""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnserve.cli import main
from bnserve.converter import foreign
from bnserve.converter.verify import run_model
from tests.converter.factory import NetConfig, write_checkpoint
from tests.converter.test_foreign_cli import _model


def test_convert_output_under_a_file_is_refused(tmp_path, capsys):
    ckpt = write_checkpoint(NetConfig(), tmp_path / "c.npz")
    (tmp_path / "afile").write_text("")
    before = sorted(os.listdir(tmp_path))
    assert main(["convert", str(ckpt), "-o", str(tmp_path / "afile" / "m.onnx")]) == 2
    assert "afile: is a file" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


def test_fold_report_that_cannot_be_written_leaves_no_model(tmp_path, capsys):
    src = _model(tmp_path)
    (tmp_path / "afile").write_text("")
    before = sorted(os.listdir(tmp_path))
    out, report = tmp_path / "out.onnx", tmp_path / "afile" / "r.json"
    assert main(["fold", str(src), "-o", str(out), "--report", str(report)]) == 2
    assert "afile: is a file" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == before


def test_float16_model_folds_within_its_own_precision(tmp_path):
    rng = np.random.default_rng(0)
    F, H, K = 8, 16, 3
    inits = {
        "W": rng.normal(size=(H, F)),
        "b": rng.normal(size=H),
        "bn.scale": rng.uniform(-2, 2, H),
        "bn.bias": rng.normal(size=H),
        "bn.mean": rng.normal(size=H),
        "bn.var": rng.uniform(0.5, 2, H),
        "W2": rng.normal(size=(K, H)),
        "b2": rng.normal(size=K),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "W", "b"], ["z"], name="fc", transB=1),
        helper.make_node(
            "BatchNormalization",
            ["z", "bn.scale", "bn.bias", "bn.mean", "bn.var"],
            ["n"],
            name="bn",
        ),
        helper.make_node("Relu", ["n"], ["a"]),
        helper.make_node("Gemm", ["a", "W2", "b2"], ["y"], name="out", transB=1),
    ]
    half = TensorProto.FLOAT16
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", half, ["N", F])],
        [helper.make_tensor_value_info("y", half, ["N", K])],
        initializer=[numpy_helper.from_array(v.astype(np.float16), k) for k, v in inits.items()],
    )
    model = helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", 17)])
    src, dst = tmp_path / "half.onnx", tmp_path / "folded.onnx"
    onnx.save(model, str(src))
    # The gate used to compare the folded float16 weights with the float16 model itself as the
    # "float64" reference (noise floor 0) and refused every correct fold (exit 3).
    result = foreign.fold_onnx_file(src, dst)
    assert [n.op_type for n in onnx.load(str(dst)).graph.node] == ["Gemm", "Relu", "Gemm"]
    assert result.parity_report["reference"].endswith("float64")
    X = rng.normal(size=(64, F)).astype(np.float16)
    a, b = run_model(src, X)["y"], run_model(dst, X)["y"]
    scale = float(np.abs(a).max())
    assert np.abs(a.astype(np.float64) - b).max() <= 4e-3 * scale  # float16 has 11 bits


def test_logits_gate_accepts_float32_noise_but_not_a_shifted_fold(tmp_path, monkeypatch):
    import dataclasses

    from bnserve.converter import convert
    from bnserve.errors import ParityError

    # An ill-conditioned network whose fold is exact in float64: its probabilities always passed,
    # its logits were refused (1.2e-3 > 2 x the unfolded error 4.8e-4) until the logits got the
    # probabilities' noise floor.
    cfg = NetConfig(
        seed=36, activation="tanh", var_range=(1e-6, 1e3), gamma_max=10.0, hidden=(32, 32, 32)
    )
    ckpt = write_checkpoint(cfg, tmp_path / "c.npz")
    result = convert.convert_checkpoint(ckpt, tmp_path / "m.onnx", logits=True)
    assert result.parity_report["logits"]["passed"]

    # A fold that shifts every logit by the same amount leaves the probabilities unchanged: the
    # logits' own float64 check must catch it (a shifted fold cannot raise its own noise floor).
    fold_mlp = convert.fold_mlp

    def shifted(net, **options):  # both candidates, full and centred, are shifted
        folded = fold_mlp(net, **options)
        last = folded.layers[-1]
        moved = dataclasses.replace(last, b=last.b + 0.5)
        return dataclasses.replace(folded, layers=(*folded.layers[:-1], moved))

    monkeypatch.setattr(convert, "fold_mlp", shifted)
    convert.convert_checkpoint(ckpt, tmp_path / "p.onnx")  # probabilities cannot see it
    try:
        convert.convert_checkpoint(ckpt, tmp_path / "l.onnx", logits=True)
    except ParityError as e:
        assert "folded logits differ" in str(e)
    else:
        raise AssertionError("a shifted fold passed the logits gate")
    assert not (tmp_path / "l.onnx").exists()
