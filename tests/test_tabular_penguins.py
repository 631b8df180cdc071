"""Real tabular data end to end, on a public data set nobody here wrote: the Palmer penguins CSV
(the `palmerpenguins` package ships it) written the way pandas users write it,
`load_penguins().to_csv(path)`, row index included. Strings (`island`, `sex`), missing cells, an
offset feature (`year`), a stray index column: refused with its fix, then trained, converted
(parity gated on raw rows), served by a real gunicorn process and answered over both APIs and
through `tritonclient` with BYTES inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import requests

from bnserve.cli import main
from bnserve.models.checkpoint import load_checkpoint
from bnserve.models.data import load_for_model
from bnserve.models.tabular import RawTable
from tests.service.support import start_server, stop_server

penguins = pytest.importorskip("palmerpenguins", reason="the test extra ships palmerpenguins")
httpclient = pytest.importorskip("tritonclient.http")

COLUMNS = ["island", "bill_length_mm", "bill_depth_mm", "flipper_length_mm", "body_mass_g"]
COLUMNS += ["sex", "year"]
ROW = {
    "island": "Biscoe",
    "bill_length_mm": 48.7,
    "bill_depth_mm": 14.1,
    "flipper_length_mm": 210,
    "body_mass_g": 4450,
    "sex": None,
    "year": 2008,
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("penguins")
    csv = root / "penguins.csv"
    penguins.load_penguins().to_csv(csv)  # the index column too, as pandas writes it by default
    out = root / "run"
    train = ["train", str(csv), "--label", "species", "--drop", "", "--out", str(out)]
    code = main([*train, "--epochs", "40", "--quiet"])
    assert code == 0
    model = root / "repo" / "penguins" / "1" / "model.onnx"
    model.parent.mkdir(parents=True)
    assert main(["convert", str(out / "checkpoint.npz"), "-o", str(model), "-q"]) == 0
    return {"csv": csv, "checkpoint": out / "checkpoint.npz", "model": model, "out": out}


def test_the_index_column_is_refused_with_its_fix(trained, tmp_path, capsys) -> None:
    code = main(["train", str(trained["csv"]), "--label", "species", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "identifier-like" in err and "--drop ''" in err and "--keep-id" in err
    assert not (tmp_path / "o").exists()


def test_a_forgotten_label_is_named_in_the_summary(trained, tmp_path, capsys) -> None:
    main(
        ["train", str(trained["csv"]), "--drop", "", "--out", str(tmp_path / "o"), "--epochs", "1"]
    )
    err = capsys.readouterr().err
    assert "label column 'year' (the last column, by default" in err
    assert "species" in err and "categorical" in err


def test_the_summary_shows_kinds_and_missing_counts(trained, tmp_path, capsys) -> None:
    train = ["train", str(trained["csv"]), "--label", "species", "--drop", ""]
    main([*train, "--epochs", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = {
        line.split()[0]: line.split()[1:] for line in err.splitlines() if line.startswith("  ")
    }
    assert lines["island"] == ["categorical", "missing", "0"]
    assert lines["sex"] == ["categorical", "missing", "11"]
    assert lines["bill_length_mm"] == ["numeric", "missing", "2"]
    assert lines["year"] == ["numeric", "missing", "0"]


def test_preprocessing_is_fitted_and_the_model_is_useful(trained) -> None:
    ckpt = load_checkpoint(trained["checkpoint"])
    pre = ckpt.preprocessor
    assert pre is not None and pre.names == COLUMNS
    assert "island=Biscoe" in ckpt.feature_names and "sex=<missing>" in ckpt.feature_names
    assert "bill_length_mm (<missing>)" in ckpt.feature_names
    assert ckpt.metrics["test_accuracy"] >= 0.9  # a real model, not a row-order cheat


def _feeds(rows: list[dict]) -> dict[str, np.ndarray]:
    out = {}
    for name in COLUMNS:
        values = [r[name] for r in rows]
        if name in ("island", "sex"):
            out[name] = np.array(["" if v is None else v for v in values], dtype=object)[:, None]
        else:
            out[name] = np.array([np.nan if v is None else v for v in values], np.float32)[:, None]
    return out


def _reference(ckpt, rows: list[dict]) -> np.ndarray:
    """The trainer's numpy preprocessing and float64 network on the same raw rows."""
    text = [["" if r[c] is None else str(np.float32(r[c])) if c not in ("island", "sex") else r[c]
             for r in rows] for c in COLUMNS]  # fmt: skip
    X = ckpt.preprocessor.transform(RawTable(COLUMNS, text, "rows"))
    return ckpt.predict_proba(X)


def test_the_onnx_file_alone_reproduces_the_preprocessing(trained) -> None:
    ckpt = load_checkpoint(trained["checkpoint"])
    rows = [ROW, {**ROW, "island": "Atlantis"}, {**ROW, "bill_length_mm": None, "sex": "male"}]
    session = ort.InferenceSession(str(trained["model"]), providers=["CPUExecutionProvider"])
    (probs,) = session.run(["probabilities"], _feeds(rows))
    np.testing.assert_allclose(probs, _reference(ckpt, rows), atol=1e-4)
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    report = json.loads(session.get_modelmeta().custom_metadata_map["bnserve.parity_report"])
    assert report["passed"] and report["argmax_agreement"] == 1.0
    # `year` (mean 2008, std 0.8): the fold keeps the centring, so float32 loses nothing to it
    assert report["max_abs_diff"] <= max(2 * report["unfolded_float32_max_abs_diff"], 1e-6)
    fold = json.loads(session.get_modelmeta().custom_metadata_map["bnserve.fold_report"])
    assert fold["standardization"]["centred"] is True


def test_evaluate_and_predict_read_the_raw_csv(trained, tmp_path, capsys) -> None:
    ckpt = load_checkpoint(trained["checkpoint"])
    X, _ = load_for_model(str(trained["csv"]), ckpt.feature_names, ckpt.class_names, "species",
                          ckpt.preprocessor)  # fmt: skip
    assert X.shape == (344, len(ckpt.feature_names))
    out = tmp_path / "pred.csv"
    assert main(["predict", str(trained["model"]), str(trained["csv"]), "-o", str(out)]) == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 345
    predicted = [line.split(",")[1] for line in lines[1:]]
    expected = ckpt.predict_proba(X).argmax(axis=1)
    assert np.mean(np.array(predicted, dtype=int) == expected) >= 0.99


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    log = tmp_path_factory.mktemp("penguin-server") / "serve.log"
    repository = trained["model"].parent.parent.parent
    live = start_server([str(repository), "--workers", "1"], log, {})
    yield live
    stop_server(live)


def test_raw_rows_over_the_simple_api(server, trained) -> None:
    ckpt = load_checkpoint(trained["checkpoint"])
    url = server.url + "/models/penguins/predict"
    answer = requests.post(url, json={"features": ROW}, timeout=10)
    assert answer.status_code == 200, answer.text
    expected = _reference(ckpt, [ROW])[0]
    got = answer.json()["probabilities"]
    np.testing.assert_allclose([got[c] for c in ckpt.class_names], expected, atol=1e-4)
    assert answer.json()["label"] == ckpt.class_names[int(expected.argmax())]
    missing = requests.post(url, json={"features": {k: v for k, v in ROW.items() if k != "sex"}},
                            timeout=10)  # fmt: skip
    assert missing.status_code == 400 and "'sex'" in missing.json()["error"]
    usage = requests.get(url, timeout=10).json()
    islands = next(c for c in usage["columns"] if c["name"] == "island")
    assert islands["kind"] == "categorical" and islands["categories"] == [
        "Biscoe",
        "Dream",
        "Torgersen",
    ]


def test_an_unseen_island_is_answered_and_counted(server) -> None:
    url = server.url + "/models/penguins/predict"
    for _ in range(3):
        answer = requests.post(url, json={"features": {**ROW, "island": "Atlantis"}}, timeout=10)
        assert answer.status_code == 200
    metrics = requests.get(server.url + "/metrics", timeout=10).text
    line = next(
        m for m in metrics.splitlines()
        if m.startswith("bnserve_unknown_categories_total") and 'input="island"' in m
    )  # fmt: skip
    assert float(line.split()[-1]) == 3.0


@pytest.mark.parametrize("binary", [False, True])
def test_tritonclient_with_bytes_inputs(server, trained, binary: bool) -> None:
    ckpt = load_checkpoint(trained["checkpoint"])
    # JSON has no NaN (tritonclient would write one): a missing number travels in binary only
    rows = [
        ROW,
        {**ROW, "island": "Dream", "sex": "female", "body_mass_g": None if binary else 3900},
    ]
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    metadata = client.get_model_metadata("penguins")
    types = {i["name"]: i["datatype"] for i in metadata["inputs"]}
    assert types["island"] == "BYTES" and types["year"] == "FP32"
    inputs = []
    for name, array in _feeds(rows).items():
        tensor = httpclient.InferInput(name, list(array.shape), types[name])
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    result = client.infer("penguins", inputs)
    np.testing.assert_allclose(result.as_numpy("probabilities"), _reference(ckpt, rows), atol=1e-4)


def test_pandas_one_hot_booleans_train_convert_and_answer(tmp_path) -> None:
    """pandas' get_dummies writes True/False columns: booleans, one float input each."""
    pandas = pytest.importorskip("pandas")
    frame = pandas.get_dummies(penguins.load_penguins(), columns=["island"])
    csv = tmp_path / "dummies.csv"
    frame.to_csv(csv, index=False)
    out, model = tmp_path / "run", tmp_path / "m.onnx"
    train = ["train", str(csv), "--label", "species", "--out", str(out), "--epochs", "20"]
    assert main([*train, "--quiet"]) == 0
    assert main(["convert", str(out / "checkpoint.npz"), "-o", str(model), "-q"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.npz")
    kinds = {c.name: c.kind for c in ckpt.preprocessor.columns}
    assert kinds["island_Biscoe"] == "boolean" and kinds["sex"] == "categorical"
    from bnserve.service.app import create_app

    client = create_app({"model": str(model)}).test_client()
    row = {k: v for k, v in ROW.items() if k != "island"}
    row |= {"island_Biscoe": True, "island_Dream": False, "island_Torgersen": "false"}
    answer = client.post("/predict", json={"features": row})
    assert answer.status_code == 200, answer.get_json()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    feeds = {
        c.name: np.array([[row[c.name]]], dtype=object)
        if c.kind == "categorical"
        else np.array([[np.nan if row[c.name] is None else float(row[c.name] in (True, "true")
                        if c.kind == "boolean" else row[c.name])]], dtype=np.float32)
        for c in ckpt.preprocessor.columns
    }  # fmt: skip
    feeds["sex"] = np.array([[""]], dtype=object)
    (expected,) = session.run(["probabilities"], feeds)
    got = answer.get_json()["probabilities"]
    np.testing.assert_allclose([got[c] for c in ckpt.class_names], expected[0], rtol=1e-6)
