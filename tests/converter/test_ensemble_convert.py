"""`bnserve convert ENSEMBLE`: one graph whose output is the mean of the members' float64
probabilities, in both layouts, centred or not, served by the unchanged service, raw columns too."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from bnserve.cli import main
from bnserve.converter import export, verify
from bnserve.converter.ensemble import convert_ensemble
from bnserve.errors import ModelError
from bnserve.models.checkpoint import file_sha256
from bnserve.models.ensemble import EnsembleResult, load_ensemble, write_ensemble
from bnserve.models.tabular import RawTable
from bnserve.models.train import TrainConfig, TrainResult
from bnserve.service.app import create_app
from tests.converter.factory import NetConfig, random_checkpoint, raw_inputs, run_onnx

ATOL = verify.DEFAULT_ATOL  # the gate's tolerance on probabilities


def _average(path: Path, X: np.ndarray) -> np.ndarray:
    ens = load_ensemble(path)
    return np.mean([c.predict_proba(X.astype(np.float64)) for c in ens.checkpoints], axis=0)


def _write_members(out: Path, ckpts: list, bagging: bool = False) -> Path:
    """An ensemble folder from ready checkpoints (as train --ensemble writes one)."""
    from bnserve.models.checkpoint import save_checkpoint

    results = [TrainResult(c, [], {"test_accuracy": None}) for c in ckpts]
    config = TrainConfig(bagging=bagging)
    result = EnsembleResult(config, results, list(range(10, 10 + len(ckpts))), {})
    return write_ensemble(
        result, out, lambda r, folder: save_checkpoint(r.checkpoint, folder / "checkpoint.npz")
    )


@pytest.fixture(scope="module")
def iris_ensemble(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("iris_ensemble")
    train = ["train", "sklearn:iris", "--out", str(out), "--ensemble", "3", "--bagging"]
    assert main([*train, "--epochs", "8", "--hidden", "8,8", "--quiet", "--jobs", "1"]) == 0
    return out


@pytest.mark.parametrize("layout", export.ENSEMBLE_LAYOUTS)
def test_one_graph_equals_the_float64_mean_of_the_members(
    iris_ensemble: Path, tmp_path: Path, layout: str
) -> None:
    model = tmp_path / "m.onnx"
    args = ["convert", str(iris_ensemble / "ensemble.json"), "-o", str(model), "--layout", layout]
    assert main([*args, "-q"]) == 0
    ens = load_ensemble(iris_ensemble)
    X = raw_inputs(ens.checkpoints[0], 64)
    expected = _average(iris_ensemble, X)
    for level in verify.LEVELS:
        got = run_onnx(model, X, level)
        np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)
    graph = onnx.load(str(model))
    assert [i.name for i in graph.graph.input] == ["input"]
    assert [o.name for o in graph.graph.output] == ["probabilities"]
    ops = [n.op_type for n in graph.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Softmax") == 1
    # one wide first Gemm over the shared input: the members' first layers side by side
    first = next(n for n in graph.graph.node if n.op_type == "Gemm")
    assert first.input[0] in ("input", "input.centred")
    weights = {t.name: t for t in graph.graph.initializer}
    assert list(weights[first.input[1]].dims) == [4, 3 * 8]
    meta = {p.key: p.value for p in graph.metadata_props}
    members = json.loads(meta["bnserve.ensemble"])
    assert members["size"] == 3 and members["bagging"] is True and members["layout"] == layout
    assert [m["seed"] for m in members["members"]] == ens.seeds
    assert [m["checkpoint_sha256"] for m in members["members"]] == ens.sha256
    assert meta["bnserve.source_sha256"] == file_sha256(iris_ensemble / "ensemble.json")
    assert json.loads(meta["bnserve.labels"]) == ens.checkpoints[0].class_names
    parity = json.loads(meta["bnserve.parity_report"])
    assert parity["passed"] and parity["fold_float64_max_abs_diff"] <= 1e-9


def test_the_service_answers_like_the_average(iris_ensemble: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    assert main(["convert", str(iris_ensemble), "-o", str(model), "-q"]) == 0  # the folder
    ens = load_ensemble(iris_ensemble)
    X = raw_inputs(ens.checkpoints[0], 3, seed=7)
    expected = _average(iris_ensemble, X)
    client = create_app({"model": str(model)}).test_client()
    for row, probs in zip(X, expected, strict=True):
        answer = client.post("/predict", json={"features": row.tolist()})
        assert answer.status_code == 200, answer.get_json()
        body = answer.get_json()
        got = [body["probabilities"][c] for c in ens.checkpoints[0].class_names]
        np.testing.assert_allclose(got, probs, atol=ATOL, rtol=0)
        assert body["label"] == ens.checkpoints[0].class_names[int(probs.argmax())]
    batch = client.post("/predict", json={"instances": X.tolist()}).get_json()["predictions"]
    assert [p["label"] for p in batch] == [
        ens.checkpoints[0].class_names[int(i)] for i in expected.argmax(axis=1)
    ]


@pytest.mark.parametrize(
    ("net", "offset"),
    [
        (NetConfig(bn="before", activation="relu"), None),  # |mean/std| ~ 100: kept centred
        (NetConfig(bn="after", activation="tanh", hidden=(8, 8, 8)), 1.0),
        (NetConfig(bn="none", activation="leaky_relu", hidden=()), 1.0),
    ],
)
def test_members_with_their_own_standardization(tmp_path: Path, net: NetConfig, offset) -> None:
    """Bagged members standardize by their own samples: each member's means and stds differ a
    little, and one Sub (or none) serves them all."""
    ckpts = []
    for k in range(3):
        c = random_checkpoint(replace(net, seed=k, input_offset_sd=offset))
        if k:  # the first member's standardization, moved by a sampling error
            rng = np.random.default_rng(k)
            base = ckpts[0].params
            c.params["input.mean"] = base["input.mean"] + 0.05 * base["input.std"] * rng.normal(
                size=net.n_features
            )
            c.params["input.std"] = base["input.std"] * rng.uniform(0.95, 1.05, net.n_features)
        ckpts.append(c)
    manifest = _write_members(tmp_path / "ens", ckpts, bagging=True)
    result = convert_ensemble(manifest, tmp_path / "m.onnx")
    std = result.fold_report["standardization"]
    if offset is None:
        assert std["centred"] is True
        assert result.op_counts.get("Sub") == 1
    X = raw_inputs(ckpts[0], 64)
    np.testing.assert_allclose(
        run_onnx(tmp_path / "m.onnx", X), _average(manifest, X), atol=ATOL, rtol=0
    )
    assert result.parity_report["passed"]
    assert len(result.fold_report["bn_layers"]) == 3 * (len(net.hidden) if net.bn != "none" else 0)


def test_old_opset_and_no_fold(tmp_path: Path) -> None:
    ckpts = [random_checkpoint(NetConfig(seed=k, input_offset_sd=1.0)) for k in range(2)]
    manifest = _write_members(tmp_path / "ens", ckpts)
    X = raw_inputs(ckpts[0], 32)
    for name, options in (("13.onnx", {"opset": 13}), ("unfolded.onnx", {"fold": False})):
        result = convert_ensemble(manifest, tmp_path / name, **options)
        np.testing.assert_allclose(
            run_onnx(tmp_path / name, X), _average(manifest, X), atol=ATOL, rtol=0
        )
        assert result.parity_report["passed"]
    assert "BatchNormalization" in result.op_counts and "Mean" in result.op_counts


def test_refusals(tmp_path: Path, capsys) -> None:
    ckpts = [
        random_checkpoint(NetConfig(seed=0)),
        random_checkpoint(NetConfig(seed=1, hidden=(4,))),
    ]
    manifest = _write_members(tmp_path / "ens", ckpts)
    with pytest.raises(ModelError, match="one shape"):
        convert_ensemble(manifest, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    same = _write_members(tmp_path / "same", ckpts[:1] * 2)
    assert main(["convert", str(same), "-o", str(tmp_path / "m.onnx"), "--logits"]) == 2
    assert "logits" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing.json"), "-o", str(tmp_path / "m.onnx")]) == 2


def test_raw_columns_with_categories_and_missing_cells(tmp_path: Path) -> None:
    """A CSV with a categorical column and missing cells: one preprocessing in front of the
    members, raw rows answered by the service like the mean of the members."""
    rng = np.random.default_rng(0)
    n = 160
    color = rng.choice(["red", "green", "blue"], size=n)
    size = rng.normal(10, 3, size=n)
    label = np.where((color == "red") | (size > 11), "yes", "no")
    lines = ["color,size,kind"]
    for i in range(n):
        cell_color = "" if i % 17 == 0 else color[i]
        cell_size = "" if i % 13 == 0 else f"{size[i]:.3f}"
        lines.append(f"{cell_color},{cell_size},{label[i]}")
    csv = tmp_path / "rows.csv"
    csv.write_text("\n".join(lines) + "\n")
    out, model = tmp_path / "run", tmp_path / "m.onnx"
    train = ["train", str(csv), "--out", str(out), "--ensemble", "3", "--bagging", "--jobs", "1"]
    assert main([*train, "--epochs", "10", "--hidden", "8", "--quiet"]) == 0
    assert main(["convert", str(out), "-o", str(model), "-q"]) == 0
    ens = load_ensemble(out)
    pre = ens.checkpoints[0].preprocessor
    assert pre is not None and pre.names == ["color", "size"]
    graph = onnx.load(str(model))
    assert [i.name for i in graph.graph.input] == ["color", "size"]
    assert sum(n.op_type == "IsNaN" for n in graph.graph.node) == 1  # once, not per member
    rows = [
        {"color": "red", "size": 8.5},
        {"color": None, "size": 12.0},
        {"color": "purple", "size": None},  # a colour never seen in training
    ]
    text = [
        ["" if r["color"] is None else r["color"] for r in rows],
        ["" if r["size"] is None else str(r["size"]) for r in rows],
    ]
    X = pre.transform(RawTable(["color", "size"], text, "rows"))
    expected = np.mean([c.predict_proba(X) for c in ens.checkpoints], axis=0)
    client = create_app({"model": str(model)}).test_client()
    for row, probs in zip(rows, expected, strict=True):
        answer = client.post("/predict", json={"features": row})
        assert answer.status_code == 200, answer.get_json()
        got = answer.get_json()["probabilities"]
        np.testing.assert_allclose(
            [got[c] for c in ens.checkpoints[0].class_names], probs, atol=ATOL
        )


def test_an_ensemble_of_one_is_a_single_models_graph(tmp_path: Path) -> None:
    ckpt = random_checkpoint(NetConfig(seed=3, input_offset_sd=1.0))
    manifest = _write_members(tmp_path / "ens", [ckpt])
    result = convert_ensemble(manifest, tmp_path / "m.onnx")
    assert result.op_counts == {"Gemm": 3, "Relu": 2, "Softmax": 1}
    X = raw_inputs(ckpt, 16)
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", X), ckpt.predict_proba(X), atol=ATOL)
