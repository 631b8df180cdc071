"""`converter.foreign` on graphs built with onnx.helper: every Gemm variant, MatMul(+Add), constants
as Constant/Identity, standardization, the safety rules, BN opsets 9 to 21, and what is kept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bnserve.converter import foreign
from bnserve.converter.cli import fold_main
from bnserve.converter.convert import convert_checkpoint
from bnserve.converter.verify import run_model
from bnserve.errors import ModelError
from tests.converter.factory import NetConfig, write_checkpoint

F, H, K = 4, 5, 3
RNG = np.random.default_rng(7)


def arr(*shape: int, low: float | None = None) -> np.ndarray:
    if low is not None:
        return RNG.uniform(low, 2.0, size=shape).astype(np.float32)
    return RNG.normal(size=shape).astype(np.float32)


def bn_inits(prefix: str, n: int) -> dict[str, np.ndarray]:
    return {
        f"{prefix}.scale": arr(n),
        f"{prefix}.bias": arr(n),
        f"{prefix}.mean": arr(n),
        f"{prefix}.var": arr(n, low=0.2),
    }


def bn_node(prefix: str, x: str, y: str, **attrs) -> onnx.NodeProto:
    ins = [x, *(f"{prefix}.{k}" for k in ("scale", "bias", "mean", "var"))]
    return helper.make_node("BatchNormalization", ins, [y], name=prefix, epsilon=1e-3, **attrs)


def make_model(
    nodes: list[onnx.NodeProto],
    inits: dict[str, np.ndarray],
    *,
    out: int = K,
    opset: int = 17,
    outputs: list[str] | None = None,
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", F])],
        [
            helper.make_tensor_value_info(o, TensorProto.FLOAT, ["N", None])
            for o in (outputs or ["y"])
        ],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model_gen_version(graph, opset_imports=[helper.make_opsetid("", opset)])


def fold_and_compare(tmp_path: Path, model: onnx.ModelProto, **kw) -> tuple[onnx.ModelProto, dict]:
    """Fold through fold_onnx_file (gate included) and compare with the original independently."""
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, str(src))
    result = foreign.fold_onnx_file(src, dst, **kw)
    folded = onnx.load(str(dst))
    onnx.checker.check_model(folded, full_check=True)
    X = np.random.default_rng(3).normal(size=(50, F)).astype(np.float32) * 3
    a, b = run_model(src, X), run_model(dst, X)
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=2e-5, rtol=1e-5)
    assert folded.graph.input == model.graph.input and folded.graph.output == model.graph.output
    return folded, result.fold_report


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (0.5, -2.0)])
@pytest.mark.parametrize("c_shape", [None, (H,), (1, H), ()])
def test_gemm_variants_then_bn_become_one_gemm(tmp_path, trans_b, alpha, beta, c_shape):
    W = arr(H, F) if trans_b else arr(F, H)
    inits = {"W": W, **bn_inits("bn", H), "W2": arr(H, K)}
    gemm_in = ["x", "W"]
    if c_shape is not None:
        inits["C"] = arr(*c_shape)
        gemm_in.append("C")
    nodes = [
        helper.make_node("Gemm", gemm_in, ["z"], name="fc", transB=trans_b, alpha=alpha, beta=beta),
        bn_node("bn", "z", "n"),
        helper.make_node("Relu", ["n"], ["a"]),
        helper.make_node("Gemm", ["a", "W2"], ["y"], name="out"),
    ]
    folded, report = fold_and_compare(tmp_path, make_model(nodes, inits))
    assert ops(folded) == ["Gemm", "Relu", "Gemm"]
    assert report["batchnorms"][0]["how"] == "into the preceding Gemm"
    fc = folded.graph.node[0]
    assert fc.name == "fc" and len(fc.input) == 3
    assert {a.name: a.i for a in fc.attribute}.get("transB", 0) == trans_b  # layout kept
    names = {t.name for t in folded.graph.initializer}
    assert not names & {"W", "C", "bn.scale", "bn.var"}  # unused initializers removed


@pytest.mark.parametrize("with_add", [True, False])
def test_matmul_add_bn_becomes_one_gemm(tmp_path, with_add):
    inits = {"W": arr(F, H), "b": arr(H), **bn_inits("bn", H), "W2": arr(H, K)}
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm")]
    if with_add:
        nodes.append(helper.make_node("Add", ["b", "m"], ["z"], name="add"))  # constant first
    nodes += [
        bn_node("bn", "z" if with_add else "m", "n"),
        helper.make_node("Tanh", ["n"], ["a"]),
        helper.make_node("MatMul", ["a", "W2"], ["y"]),
    ]
    if not with_add:
        del inits["b"]
    folded, _ = fold_and_compare(tmp_path, make_model(nodes, inits))
    assert ops(folded) == ["Gemm", "Tanh", "MatMul"]


def test_constants_from_constant_and_identity_nodes(tmp_path):
    inits = {"W": arr(F, H), "bn.mean": arr(H), "W2": arr(H, K)}
    nodes = [
        helper.make_node("Identity", ["W"], ["W_id"]),
        helper.make_node("Gemm", ["x", "W_id"], ["z"], name="fc"),
        helper.make_node("Constant", [], ["bn.scale"], value=numpy_helper.from_array(arr(H), "s")),
        helper.make_node("Constant", [], ["bias_c"], value_floats=arr(H).tolist()),
        helper.make_node("Identity", ["bias_c"], ["bn.bias"]),
        helper.make_node(
            "Constant", [], ["bn.var"], value=numpy_helper.from_array(arr(H, low=0.5))
        ),
        bn_node("bn", "z", "n"),
        helper.make_node("Relu", ["n"], ["a"]),
        helper.make_node("Gemm", ["a", "W2"], ["y"]),
    ]
    folded, report = fold_and_compare(tmp_path, make_model(nodes, inits))
    # The Constant/Identity nodes that fed only the folded nodes went with them.
    assert ops(folded) == ["Gemm", "Relu", "Gemm"]
    assert report["batchnorms"][0]["status"] == "folded"


def test_shared_weight_is_copied_not_changed(tmp_path):
    W = arr(F, F)
    inits = {"W": W, **bn_inits("bn", F), "W2": arr(F, K)}
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["z1"], name="first"),
        bn_node("bn", "z1", "n"),
        helper.make_node("Relu", ["n"], ["a"]),
        helper.make_node("Gemm", ["a", "W"], ["z2"], name="second"),  # same W, no BN
        helper.make_node("Relu", ["z2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "W2"], ["y"]),
    ]
    folded, _ = fold_and_compare(tmp_path, make_model(nodes, inits))
    second = next(n for n in folded.graph.node if n.name == "second")
    assert second.input[1] == "W"
    kept = next(t for t in folded.graph.initializer if t.name == "W")
    np.testing.assert_array_equal(numpy_helper.to_array(kept), W)


def test_intermediate_with_another_consumer_or_graph_output_is_not_folded(tmp_path):
    inits = {"W": arr(F, H), **bn_inits("bn", H), "W2": arr(H, K)}
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["z"], name="fc"),
        bn_node("bn", "z", "n"),
        helper.make_node("Relu", ["n"], ["a"]),
        helper.make_node("Gemm", ["a", "W2"], ["y"]),
    ]
    folded, report = fold_and_compare(tmp_path, make_model(nodes, inits, outputs=["y", "z"]))
    assert ops(folded).count("BatchNormalization") == 1
    assert "'z'" in report["batchnorms"][0]["reason"]


def test_never_across_a_nonlinearity(tmp_path):
    # linear -> ReLU -> BN -> Softmax: the BN can only go forward, and there is no linear layer.
    inits = {"W": arr(F, H), **bn_inits("bn", H)}
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["z"], name="fc"),
        helper.make_node("Relu", ["z"], ["a"]),
        bn_node("bn", "a", "n"),
        helper.make_node("Softmax", ["n"], ["y"], axis=1),
    ]
    folded, report = fold_and_compare(tmp_path, make_model(nodes, inits))
    assert ops(folded) == ["Gemm", "Relu", "BatchNormalization", "Softmax"]
    entry = report["batchnorms"][0]
    assert entry["status"] == "kept" and "no linear layer" in entry["reason"]


def test_consecutive_bns_become_one(tmp_path):
    inits = {"W": arr(F, H), **bn_inits("bn1", H), **bn_inits("bn2", H)}
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["z"], name="fc"),
        helper.make_node("Relu", ["z"], ["a"]),
        bn_node("bn1", "a", "n1"),
        bn_node("bn2", "n1", "n2"),
        helper.make_node("Relu", ["n2"], ["y"]),
    ]
    folded, report = fold_and_compare(tmp_path, make_model(nodes, inits))
    assert ops(folded) == ["Gemm", "Relu", "BatchNormalization", "Relu"]
    assert [b["status"] for b in report["batchnorms"]] == ["merged", "merged"]


@pytest.mark.parametrize("form", ["sub_div", "mul_add"])
def test_input_standardization_folds_into_first_linear(tmp_path, form):
    mean, std = arr(F) * 10, arr(F, low=0.5)
    inits = {"m": mean, "d": std, "W": arr(F, K), "b": arr(K)}
    if form == "sub_div":
        nodes = [
            helper.make_node("Sub", ["x", "m"], ["c"]),
            helper.make_node("Div", ["c", "d"], ["s"]),
        ]
    else:  # x * (1/std) + (-mean/std), with a [1, F] constant
        inits["d"], inits["m"] = (1 / std).reshape(1, F), (-mean / std).reshape(1, F)
        nodes = [
            helper.make_node("Mul", ["x", "d"], ["c"]),
            helper.make_node("Add", ["m", "c"], ["s"]),
        ]
    nodes.append(helper.make_node("Gemm", ["s", "W", "b"], ["y"], name="fc"))
    folded, report = fold_and_compare(tmp_path, make_model(nodes, inits))
    assert ops(folded) == ["Gemm"]
    assert len(report["affine_ops"]) == 2 and report["batchnorms"] == []


@pytest.mark.parametrize("opset", [9, 11, 13, 14, 15, 21])
def test_bn_opsets_9_to_21(tmp_path, opset):
    inits = {**bn_inits("bn", F), "W": arr(K, F), "b": arr(K)}
    nodes = [
        bn_node("bn", "x", "n"),
        helper.make_node("Gemm", ["n", "W", "b"], ["y"], name="fc", transB=1),
    ]
    folded, report = fold_and_compare(tmp_path, make_model(nodes, inits, opset=opset))
    assert ops(folded) == ["Gemm"] and report["opset"] == opset
    assert report["batchnorms"][0]["how"] == "into the following Gemm"


def test_non_constant_statistics_are_left_and_reported(tmp_path):
    inits = {"W": arr(F, H), **bn_inits("bn", H), "W2": arr(H, K)}
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["z"], name="fc"),
        helper.make_node("Abs", ["bn.var"], ["var_abs"]),  # computed at run time
        helper.make_node(
            "BatchNormalization",
            ["z", "bn.scale", "bn.bias", "bn.mean", "var_abs"],
            ["n"],
            name="bn",
        ),
        helper.make_node("Gemm", ["n", "W2"], ["y"]),
    ]
    folded, report = fold_and_compare(tmp_path, make_model(nodes, inits))
    assert ops(folded).count("BatchNormalization") == 1
    assert "not constants (var)" in report["batchnorms"][0]["reason"]


@pytest.mark.parametrize(
    ("attrs", "outputs", "opset"),
    [({"training_mode": 1}, 1, 15), ({}, 5, 9)],  # opset 9: the extra outputs mean training
)
def test_training_mode_bn_is_refused(attrs, outputs, opset):
    inits = {**bn_inits("bn", F), "W": arr(F, K)}
    outs = ["n"] + [f"o{i}" for i in range(outputs - 1)]
    ins = ["x", "bn.scale", "bn.bias", "bn.mean", "bn.var"]
    nodes = [
        helper.make_node("BatchNormalization", ins, outs, name="bn", **attrs),
        helper.make_node("Gemm", ["n", "W"], ["y"]),
    ]
    with pytest.raises(ModelError, match="training mode"):
        foreign.fold_model(make_model(nodes, inits, opset=opset))


def test_metadata_and_unrelated_nodes_are_kept(tmp_path):
    inits = {"W": arr(F, H), **bn_inits("bn", H), "W2": arr(H, K), "unused": arr(2)}
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["z"], name="fc"),
        bn_node("bn", "z", "n"),
        helper.make_node("LeakyRelu", ["n"], ["a"], alpha=0.1, name="act"),
        helper.make_node("Gemm", ["a", "W2"], ["l"]),
        helper.make_node("Softmax", ["l"], ["y"], axis=1, name="sm"),
    ]
    model = make_model(nodes, inits)
    model.producer_name, model.doc_string = "someone", "their model"
    helper.set_model_props(model, {"author": "x", "bnserve.labels": '["a", "b", "c"]'})
    folded, report = fold_and_compare(tmp_path, model)
    meta = {p.key: p.value for p in folded.metadata_props}
    assert meta["author"] == "x" and meta["bnserve.labels"] == '["a", "b", "c"]'
    assert {"bnserve.fold_report", "bnserve.parity_report", "bnserve.fold_source_sha256"} <= set(
        meta
    )
    assert folded.producer_name == "someone" and folded.doc_string == "their model"
    assert [(n.name, n.op_type) for n in folded.graph.node][1:] == [
        ("act", "LeakyRelu"),
        ("", "Gemm"),
        ("sm", "Softmax"),
    ]
    assert "unused" not in {t.name for t in folded.graph.initializer}
    assert report["nodes_before"] == 5 and report["nodes_after"] == 4


def test_probe_file_is_used(tmp_path):
    inits = {**bn_inits("bn", F), "W": arr(F, K)}
    nodes = [bn_node("bn", "x", "n"), helper.make_node("Gemm", ["n", "W"], ["y"])]
    X = np.random.default_rng(0).normal(size=(9, F)).astype(np.float32)
    np.save(tmp_path / "probe.npy", X)
    _, _ = fold_and_compare(tmp_path, make_model(nodes, inits), probe=tmp_path / "probe.npy")
    report = foreign.fold_onnx_file(
        tmp_path / "in.onnx", tmp_path / "o2.onnx", probe=tmp_path / "probe.npy"
    ).parity_report
    assert report["probes"] == 9 and report["probe_source"].endswith("probe.npy")


def test_bnserve_no_fold_model_becomes_the_folded_one(tmp_path):
    """Our own `convert --no-fold` graph (Sub/Div, Gemm, BN) folds to Gemm/Relu/Softmax only."""
    ckpt = write_checkpoint(NetConfig(input_offset_sd=1.0), tmp_path / "c.npz")
    convert_checkpoint(ckpt, tmp_path / "unfolded.onnx", fold=False)
    result = foreign.fold_onnx_file(tmp_path / "unfolded.onnx", tmp_path / "f.onnx")
    folded = onnx.load(str(tmp_path / "f.onnx"))
    assert set(ops(folded)) == {"Gemm", "Relu", "Softmax"}
    assert all(b["status"] == "folded" for b in result.fold_report["batchnorms"])
    meta = {p.key for p in folded.metadata_props}
    assert {"bnserve.labels", "bnserve.feature_names", "bnserve.format_version"} <= meta


def test_float64_reference_without_onnxruntime_double_kernels(tmp_path, capsys):
    # onnxruntime has no float64 Elu: the reference runs in onnx's reference evaluator, still in
    # float64, and says so; it never drops to float32 silently.
    inits = {"W": arr(F, H), **bn_inits("bn", H), "W2": arr(H, K)}
    nodes = [
        helper.make_node("Gemm", ["x", "W"], ["z"], name="fc"),
        bn_node("bn", "z", "n"),
        helper.make_node("Elu", ["n"], ["a"], alpha=0.5),
        helper.make_node("MatMul", ["a", "W2"], ["y"]),
    ]
    model = make_model(nodes, inits)
    x64 = np.random.default_rng(5).normal(size=(7, F))
    outputs, engine = foreign._run_float64(model, x64)
    assert engine == "onnx.reference"
    # against the same network in numpy float64
    w, w2 = inits["W"].astype(np.float64), inits["W2"].astype(np.float64)
    var = inits["bn.var"].astype(np.float64) + float(np.float32(1e-3))
    n = (x64 @ w - inits["bn.mean"]) / np.sqrt(var) * inits["bn.scale"] + inits["bn.bias"]
    expected = np.where(n > 0, n, 0.5 * np.expm1(n)) @ w2
    np.testing.assert_allclose(outputs["y"], expected, rtol=1e-12, atol=1e-12)
    folded, report = fold_and_compare(tmp_path, model)
    assert ops(folded) == ["Gemm", "Elu", "MatMul"]
    assert report["batchnorms"][0]["status"] == "folded"
    meta = {p.key: p.value for p in folded.metadata_props}
    parity = json.loads(meta["bnserve.parity_report"])
    assert parity["reference"] == "input model in onnx.reference, float64"
    assert parity["fold_float64_max_rel_diff"] <= 1e-9
    src = tmp_path / "cli_in.onnx"
    onnx.save(model, str(src))
    assert fold_main([str(src), "-o", str(tmp_path / "cli_out.onnx")]) == 0
    assert "reference: input model in onnx.reference, float64" in capsys.readouterr().out
