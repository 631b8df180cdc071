"""`bnserve fold` on real torch 2.13 exports: TorchScript (`dynamo=False`) and the dynamo exporter
with and without `optimize`; the folded model must match torch in eval mode."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnserve.converter.foreign import fold_onnx_file
from bnserve.converter.verify import run_model

torch = pytest.importorskip("torch")
nn = torch.nn

F, H, C = 6, 16, 3


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial frozen statistics (fresh BN layers have mean 0, var 1, gamma 1, beta 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.3 + 2 * torch.rand(m.num_features, generator=g))
                if m.affine:
                    m.weight.copy_(torch.randn(m.num_features, generator=g))
                    m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


class Head(nn.Module):
    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return torch.softmax(self.body(x), dim=1)


class BnAlsoOutput(nn.Module):
    """ReLU -> BN whose output is returned too: it must not be folded."""

    def __init__(self):
        super().__init__()
        self.l1, self.bn, self.l2 = nn.Linear(F, H), nn.BatchNorm1d(H), nn.Linear(H, C)

    def forward(self, x):
        z = self.bn(torch.relu(self.l1(x)))
        return torch.softmax(self.l2(z), dim=1), z


def _models() -> dict[str, tuple[nn.Module, int]]:
    """name -> (model, BatchNormalization nodes that must remain after folding)."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d
    return {
        "linear_bn_relu_stack": (
            Head(
                nn.Linear(F, H),
                bn(H),
                nn.ReLU(),
                nn.Linear(H, H),
                bn(H),
                nn.ReLU(),
                nn.Linear(H, C),
            ),
            0,
        ),
        "linear_relu_bn_linear": (Head(nn.Linear(F, H), nn.ReLU(), bn(H), nn.Linear(H, C)), 0),
        "bn_first": (Head(bn(F), nn.Linear(F, H), nn.Tanh(), nn.Linear(H, C)), 0),
        "affine_false": (
            Head(
                nn.Linear(F, H),
                bn(H, affine=False),
                nn.ReLU(),
                bn(H, affine=False),
                nn.Linear(H, C),
            ),
            0,
        ),
        "bias_false": (Head(nn.Linear(F, H, bias=False), bn(H), nn.ReLU(), nn.Linear(H, C)), 0),
        "two_bns_after_linear": (
            Head(nn.Linear(F, H), bn(H), bn(H), nn.ReLU(), nn.Linear(H, C)),
            0,
        ),
        # Between two ReLUs nothing linear is adjacent: the two BNs become one, which stays.
        "two_bns_between_relus": (
            Head(nn.Linear(F, H), nn.ReLU(), bn(H), bn(H), nn.ReLU(), nn.Linear(H, C)),
            1,
        ),
        "bn_also_output": (BnAlsoOutput(), 1),
    }


def _export_torchscript(model: nn.Module, path: Path) -> None:
    outputs = ["probabilities", "bn_out"] if isinstance(model, BnAlsoOutput) else ["probabilities"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.randn(4, F),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["input", *outputs]},
        )


def _export_dynamo(model: nn.Module, path: Path, optimize: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (torch.randn(4, F),),
            dynamo=True,
            optimize=optimize,
            input_names=["input"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            verbose=False,
        )
        program.save(str(path))


def _torch_outputs(model: nn.Module, X: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(X))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _check_folded(model: nn.Module, src: Path, out: Path, keep_bn: int) -> dict:
    result = fold_onnx_file(src, out, atol=1e-5)
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    ops = [n.op_type for n in folded.graph.node]
    assert ops.count("BatchNormalization") == keep_bn, ops
    # Interface unchanged: names, order, shapes with the symbolic batch dimension.
    original = onnx.load(str(src))
    assert folded.graph.input == original.graph.input
    assert folded.graph.output == original.graph.output
    X = np.random.default_rng(1).normal(size=(64, F)).astype(np.float32)
    got = run_model(out, X, "all")
    for (name, value), expected in zip(got.items(), _torch_outputs(model, X), strict=True):
        np.testing.assert_allclose(value, expected, atol=1e-5, rtol=0, err_msg=name)
    assert result.parity_report["passed"]
    return result.fold_report


@pytest.mark.parametrize("name", list(_models()))
def test_torchscript_export_folds_and_matches_torch(tmp_path, name):
    model, keep = _models()[name]
    model = _randomize_bn(model, seed=len(name))
    _export_torchscript(model, tmp_path / "m.onnx")
    before = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "BatchNormalization" in before  # the exporter kept BN: there is something to fold
    report = _check_folded(model, tmp_path / "m.onnx", tmp_path / "f.onnx", keep)
    kept = [b for b in report["batchnorms"] if b["status"] != "folded"]
    if name == "bn_also_output":
        assert len(kept) == 1 and "graph output" in kept[0]["reason"]
    if name == "two_bns_between_relus":
        assert [b["status"] for b in report["batchnorms"]] == ["merged", "merged"]
    if name == "bias_false":  # MatMul (no bias) + BN became one Gemm
        assert report["operators_before"].get("MatMul") == 1
        assert "MatMul" not in report["operators_after"]


# The dynamo exporter takes seconds per model: one model with every pattern, both settings.
def _kitchen_sink() -> nn.Module:
    torch.manual_seed(1)
    bn = nn.BatchNorm1d
    return _randomize_bn(
        Head(
            bn(F),  # on the input
            nn.Linear(F, H),
            bn(H),  # after a linear layer (dynamo's optimizer folds this one itself)
            nn.ReLU(),
            nn.Linear(H, H, bias=False),
            nn.ReLU(),
            bn(H, affine=False),  # after an activation
            nn.Linear(H, C),
        ),
        seed=3,
    )


@pytest.mark.slow
@pytest.mark.parametrize("optimize", [True, False])
def test_dynamo_export_folds_and_matches_torch(tmp_path, optimize):
    model = _kitchen_sink()
    try:
        _export_dynamo(model, tmp_path / "m.onnx", optimize)
    except Exception as exc:  # pragma: no cover - the exporter needs onnxscript
        pytest.skip(f"dynamo exporter unavailable: {exc}")
    before = [n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    # optimize=True folds the BN right after Linear itself; optimize=False keeps all three, and
    # builds the affine=False BN's scale/bias at run time (Shape -> Expand): not constants.
    assert before.count("BatchNormalization") == (2 if optimize else 3)
    report = _check_folded(model, tmp_path / "m.onnx", tmp_path / "f.onnx", 0 if optimize else 1)
    if not optimize:
        kept = [b for b in report["batchnorms"] if b["status"] == "kept"]
        assert len(kept) == 1 and "not constants" in kept[0]["reason"]
