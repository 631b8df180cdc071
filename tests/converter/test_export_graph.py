"""The exported graphs: operators, interface, metadata, opsets, determinism, batch sizes, torch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnserve.converter import export
from bnserve.converter.convert import convert_checkpoint
from bnserve.models.checkpoint import load_checkpoint
from bnserve.models.network import logits_eval
from tests.converter.factory import NetConfig, raw_inputs, run_onnx, write_checkpoint

FOLDED_OPS = {"Gemm", "Relu", "LeakyRelu", "Tanh", "Sigmoid", "Softmax"}


@pytest.fixture(params=["before", "after", "none"])
def ckpt_path(request, tmp_path: Path) -> Path:
    cfg = NetConfig(bn=request.param, activation="leaky_relu", leaky_slope=0.2, input_offset_sd=1.0)
    return write_checkpoint(cfg, tmp_path / "ckpt.npz")


def test_folded_graph_has_only_gemm_activation_softmax(ckpt_path: Path, tmp_path: Path) -> None:
    convert_checkpoint(ckpt_path, tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops
    assert set(ops) <= FOLDED_OPS, ops
    assert ops.count("Gemm") == 3 and ops[-1] == "Softmax"
    leaky = [n for n in model.graph.node if n.op_type == "LeakyRelu"]
    assert len(leaky) == 2
    assert all(abs(onnx.helper.get_attribute_value(n.attribute[0]) - 0.2) < 1e-7 for n in leaky)
    onnx.checker.check_model(model, full_check=True)


def test_interface_and_metadata_contract(ckpt_path: Path, tmp_path: Path) -> None:
    convert_checkpoint(ckpt_path, tmp_path / "m.onnx", logits=True)
    model = onnx.load(str(tmp_path / "m.onnx"))
    (inp,) = model.graph.input
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and dims[1].dim_value == 6
    assert [o.name for o in model.graph.output] == ["probabilities", "logits"]
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 3
    assert model.producer_name == "bnserve"
    meta = {p.key: p.value for p in model.metadata_props}
    assert list(meta) == list(export.METADATA_KEYS)
    assert meta["bnserve.format_version"] == "1"
    assert meta["bnserve.output_kind"] == "probabilities"
    assert json.loads(meta["bnserve.labels"]) == ["class_0", "class_1", "class_2"]
    assert json.loads(meta["bnserve.feature_names"]) == [f"f{j}" for j in range(6)]
    assert meta["bnserve.stats"] == "running"
    assert json.loads(meta["bnserve.parity_report"])["passed"] is True
    assert meta["bnserve.data_fingerprint"] == "sha256:test"
    assert len(meta["bnserve.source_sha256"]) == 64
    # --logits reproduces the float64 logits of the unfolded network.
    ckpt = load_checkpoint(ckpt_path)
    X = raw_inputs(ckpt, 50)
    ref = logits_eval(ckpt.spec, ckpt.params, X.astype(np.float64))
    np.testing.assert_allclose(
        run_onnx(tmp_path / "m.onnx", X, output="logits"), ref, rtol=1e-4, atol=1e-4
    )


def test_no_fold_graph_keeps_batchnorm_with_its_epsilon(tmp_path: Path) -> None:
    path = write_checkpoint(NetConfig(bn="before", eps=1e-3), tmp_path / "c.npz")
    convert_checkpoint(path, tmp_path / "m.onnx", fold=False)
    model = onnx.load(str(tmp_path / "m.onnx"))
    ops = [n.op_type for n in model.graph.node]
    assert ops[:2] == ["Sub", "Div"] and ops.count("BatchNormalization") == 2
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            eps = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}["epsilon"]
            assert eps == pytest.approx(1e-3, rel=1e-7)
    assert (
        json.loads({p.key: p.value for p in model.metadata_props}["bnserve.fold_report"])["folded"]
        is False
    )


def test_reconversion_is_byte_identical(ckpt_path: Path, tmp_path: Path) -> None:
    for fold in (True, False):
        convert_checkpoint(ckpt_path, tmp_path / "a.onnx", fold=fold)
        convert_checkpoint(ckpt_path, tmp_path / "b.onnx", fold=fold)
        assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


@pytest.mark.parametrize("opset", range(export.MIN_OPSET, export.DEFAULT_OPSET + 1))
def test_every_opset_from_13_to_default(opset: int, tmp_path: Path) -> None:
    path = write_checkpoint(
        NetConfig(bn="after", activation="sigmoid", input_offset_sd=1.0), tmp_path / "c.npz"
    )
    result = convert_checkpoint(path, tmp_path / "m.onnx", opset=opset)
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [(o.domain, o.version) for o in model.opset_import] == [("", opset)]
    assert result.parity_report["max_abs_diff"] <= 1e-5


def test_population_statistics_are_used_when_asked(tmp_path: Path) -> None:
    path = write_checkpoint(NetConfig(population=True, input_offset_sd=1.0), tmp_path / "c.npz")
    convert_checkpoint(path, tmp_path / "run.onnx", stats="running")
    convert_checkpoint(path, tmp_path / "pop.onnx", stats="population")
    ckpt = load_checkpoint(path)
    X = raw_inputs(ckpt, 64)
    for stats in ("running", "population"):
        got = run_onnx(tmp_path / f"{stats[:3]}.onnx", X)
        np.testing.assert_allclose(got, ckpt.predict_proba(X.astype(np.float64), stats), atol=1e-5)
    assert not np.allclose(
        run_onnx(tmp_path / "run.onnx", X), run_onnx(tmp_path / "pop.onnx", X), atol=1e-3
    )


def test_same_per_row_outputs_for_batch_sizes_1_2_7_1024(ckpt_path: Path, tmp_path: Path) -> None:
    convert_checkpoint(ckpt_path, tmp_path / "m.onnx")
    X = raw_inputs(load_checkpoint(ckpt_path), 1024)
    full = run_onnx(tmp_path / "m.onnx", X)
    for bs in (1, 2, 7):
        rows = np.concatenate(
            [run_onnx(tmp_path / "m.onnx", X[i : i + bs]) for i in range(0, 70, bs)]
        )
        n = len(rows)
        # Different batch sizes may take different GEMM kernels; allow float32 rounding only.
        np.testing.assert_allclose(rows, full[:n], rtol=0, atol=1e-6)
        assert (rows.argmax(1) == full[:n].argmax(1)).all()


def _torch():
    """torch, or a skip saying why: it is a test-only extra (`pip install torch==2.13.0`)."""
    return pytest.importorskip("torch", reason="torch is not installed (test extra: torch==2.13.0)")


def _torch_model(ckpt) -> torch.nn.Sequential:  # noqa: F821 (torch is imported lazily)
    """The checkpoint's network in torch, eval mode, weights copied (W [in, out] -> weight [out, in])."""
    torch = _torch()
    spec, p = ckpt.spec, ckpt.params
    act = {
        "relu": torch.nn.ReLU,
        "tanh": torch.nn.Tanh,
        "sigmoid": torch.nn.Sigmoid,
        "leaky_relu": lambda: torch.nn.LeakyReLU(spec.leaky_slope),
    }[spec.activation]
    t = lambda a: torch.tensor(np.asarray(a), dtype=torch.float64)  # noqa: E731
    layers: list[torch.nn.Module] = []
    fan_in = spec.n_features
    for i, width in enumerate(spec.hidden):
        lin = torch.nn.Linear(fan_in, width, bias=spec.bn != "before", dtype=torch.float64)
        lin.weight.data = t(p[f"hidden.{i}.W"]).T.contiguous()
        if lin.bias is not None:
            lin.bias.data = t(p[f"hidden.{i}.b"])
        bn = None
        if spec.has_bn:
            bn = torch.nn.BatchNorm1d(
                width, eps=spec.bn_eps, momentum=spec.bn_momentum, dtype=torch.float64
            )
            bn.weight.data, bn.bias.data = t(p[f"hidden.{i}.gamma"]), t(p[f"hidden.{i}.beta"])
            stats = ckpt.stats_default
            bn.running_mean.data = t(p[f"hidden.{i}.{stats}_mean"])
            bn.running_var.data = t(p[f"hidden.{i}.{stats}_var"])
        layers += [
            lin,
            *([bn] if spec.bn == "before" else []),
            act(),
            *([bn] if spec.bn == "after" else []),
        ]
        fan_in = width
    out = torch.nn.Linear(fan_in, spec.n_classes, dtype=torch.float64)
    out.weight.data, out.bias.data = t(p["output.W"]).T.contiguous(), t(p["output.b"])
    return torch.nn.Sequential(*layers, out, torch.nn.Softmax(dim=1)).eval()


def _torch_probs(ckpt, X: np.ndarray) -> np.ndarray:
    torch = _torch()
    Xs = (X.astype(np.float64) - ckpt.params["input.mean"]) / ckpt.params["input.std"]
    with torch.no_grad():
        return _torch_model(ckpt)(torch.tensor(Xs)).numpy()


@pytest.mark.parametrize("bn", ["before", "after"])
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "tanh", "sigmoid"])
def test_random_checkpoint_matches_torch_eval(bn: str, activation: str, tmp_path: Path) -> None:
    path = write_checkpoint(
        NetConfig(bn=bn, activation=activation, input_offset_sd=1.0), tmp_path / "c.npz"
    )
    convert_checkpoint(path, tmp_path / "m.onnx")
    ckpt = load_checkpoint(path)
    X = raw_inputs(ckpt, 200)
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", X), _torch_probs(ckpt, X), atol=1e-5)


def test_checkpoint_trained_by_bnserve_train_matches_torch(iris_run: Path, tmp_path: Path) -> None:
    ckpt_path = iris_run / "checkpoint.npz"
    convert_checkpoint(ckpt_path, tmp_path / "m.onnx")
    ckpt = load_checkpoint(ckpt_path)
    X = raw_inputs(ckpt, 300)
    expected = _torch_probs(ckpt, X)
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", X), expected, atol=1e-5)
    assert (run_onnx(tmp_path / "m.onnx", X).argmax(1) == expected.argmax(1)).mean() > 0.99


def test_every_trainer_activation_has_an_onnx_operator() -> None:
    # A new activation in the trainer's table must come with its ONNX operator here.
    from bnserve.models.layers import ACTIVATIONS

    assert set(export._ACTIVATION_OPS) == set(ACTIVATIONS)
