"""The training profile (models/profile.py -> bnserve.profile -> service/profile.py): computed on
the training split, written by convert, shown by inspect and the V2 metadata, and every request
checked against it: flagged in the answer, counted, ignored or refused."""

from __future__ import annotations

import json

import pytest

from bnserve.cli import main
from bnserve.models.checkpoint import load_checkpoint
from bnserve.models.data import load_dataset
from bnserve.service.app import create_app


@pytest.fixture(scope="module")
def iris_model(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("profile")
    assert (
        main(["train", "sklearn:iris", "--out", str(root / "run"), "--epochs", "5", "--quiet"]) == 0
    )
    model = root / "iris.onnx"
    assert main(["convert", str(root / "run" / "checkpoint.npz"), "-o", str(model), "-q"]) == 0
    return root / "run" / "checkpoint.npz", model


def test_the_profile_is_the_training_splits(iris_model) -> None:
    ckpt = load_checkpoint(iris_model[0])
    entries = {e["name"]: e for e in ckpt.profile["inputs"]}
    data = load_dataset("sklearn:iris")
    assert set(entries) == set(data.feature_names)
    first = entries[data.feature_names[0]]
    assert first["count"] == ckpt.metrics["n_train"]  # the training rows only
    assert data.X[:, 0].min() <= first["min"] <= first["quantiles"][0] <= first["quantiles"][-1]
    assert first["quantiles"] == sorted(first["quantiles"]) and first["max"] <= data.X[:, 0].max()


def test_inspect_and_v2_metadata_show_it(iris_model, capsys) -> None:
    assert main(["inspect", str(iris_model[1])]) == 0
    assert "training profile (4 inputs)" in capsys.readouterr().out
    client = create_app({"model": str(iris_model[1])}).test_client()
    profile = client.get("/v2/models/iris").get_json()["parameters"]["profile"]
    assert len(profile["inputs"]) == 4
    # Triton's model configuration carries it too, as the JSON text of a string parameter
    config = client.get("/v2/models/iris/config").get_json()
    assert json.loads(config["parameters"]["profile"]["string_value"]) == profile


def test_out_of_range_inputs_are_flagged_counted_or_refused(iris_model) -> None:
    ckpt = load_checkpoint(iris_model[0])
    first = ckpt.profile["inputs"][0]
    inside = [5.1, 3.5, 1.4, 0.2]
    far = [first["max"] + 5 * first["std"], 3.5, 1.4, 0.2]
    client = create_app({"model": str(iris_model[1])}).test_client()
    answer = client.post("/predict", json={"instances": [inside, far]}).get_json()["predictions"]
    assert "warnings" not in answer[0]
    (warning,) = answer[1]["warnings"]
    assert warning["input"] == first["name"] and warning["value"] == pytest.approx(far[0])
    assert warning["training_range"] == [first["min"], first["max"]]
    assert warning["allowed"][1] == pytest.approx(first["max"] + 4 * first["std"])
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'bnserve_out_of_range_total{{input="{first["name"]}",model="iris"}}' in metrics
    body = {
        "inputs": [{"name": "input", "shape": [2, 4], "datatype": "FP32", "data": [inside, far]}]
    }
    v2 = client.post("/v2/models/iris/infer", json=body).get_json()
    assert [w["row"] for w in v2["parameters"]["out_of_range"]] == [1]
    wide = create_app({"model": str(iris_model[1]), "out_of_range_k": 10.0}).test_client()
    assert "warnings" not in wide.post("/predict", json={"features": far}).get_json()
    ignore = create_app({"model": str(iris_model[1]), "on_out_of_range": "ignore"}).test_client()
    assert "warnings" not in ignore.post("/predict", json={"features": far}).get_json()
    reject = create_app({"model": str(iris_model[1]), "on_out_of_range": "reject"}).test_client()
    refused = reject.post("/predict", json={"features": far})
    assert refused.status_code == 400 and first["name"] in refused.get_json()["error"]
    assert reject.post("/predict", json={"features": inside}).status_code == 200


def test_drift_bins_and_psi_match_their_definitions(tmp_path) -> None:
    import numpy as np

    from bnserve.service.drift import BINS, DriftWindow, bin_counts, psi
    from bnserve.service.profile import Profile

    rng = np.random.default_rng(0)
    train = rng.normal(size=(5000, 2))
    deciles = np.quantile(train, np.linspace(0.1, 0.9, 9), axis=0).T
    values = np.concatenate([rng.normal(size=(900, 2)), np.full((100, 2), np.nan)])
    values[:, 1] += 1.0  # the second input drifts
    counts = bin_counts(values, deciles)
    for j in range(2):
        present = values[:, j][~np.isnan(values[:, j])]
        expected = np.bincount(np.searchsorted(deciles[j], present, side="left"), minlength=BINS)
        np.testing.assert_array_equal(counts[j], expected)
    shares = counts / counts.sum(axis=1, keepdims=True)
    manual = ((shares - 0.1) * np.log(np.maximum(shares, 1e-4) / 0.1)).sum(axis=1)
    np.testing.assert_allclose(psi(counts), manual, rtol=1e-12)
    assert psi(counts)[0] < 0.1 < 0.2 < psi(counts)[1]
    # two workers sharing one window file see each other's counts
    profile = Profile(("a", "b"), train.min(0), train.max(0), train.std(0), deciles, {})
    first, second = (DriftWindow(profile, 600, tmp_path / "drift.bin") for _ in range(2))
    first.observe(values[:500])
    second.observe(values[500:])
    first.flush()
    np.testing.assert_array_equal(second.totals(), counts)
    assert second.report()["inputs"][0]["name"] == "b"  # the shifted input first


def test_drift_route_over_http(iris_model) -> None:
    client = create_app({"model": str(iris_model[1])}).test_client()
    rows = [[5.1, 3.5, 1.4, 0.2]] * 50
    assert client.post("/predict", json={"instances": rows}).status_code == 200
    report = client.get("/models/iris/drift").get_json()
    assert report["model"] == "iris" and report["rows"] == 50
    assert all(entry["shifted"] for entry in report["inputs"])  # one repeated row: all in 1 bin
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'bnserve_drift_psi{input="' in metrics
