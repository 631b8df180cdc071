"""Out-of-core training (`bnserve train --stream`, models/stream.py): the streaming statistics
equal numpy's on the whole data, the hash split is stable and reproducible, CSV and Parquet
stream the same data set, population statistics equal the in-memory ones, and a streamed model
trains, is evaluated on its own held-out rows and converts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bnserve.cli import main
from bnserve.models import stream
from bnserve.models.checkpoint import load_checkpoint
from bnserve.models.data import fingerprint, load_dataset
from bnserve.models.network import NetworkSpec, init_params
from bnserve.models.train import TrainConfig, population_statistics


def _iris_files(tmp_path, copies: int = 4) -> tuple[str, str]:
    from sklearn.datasets import load_iris

    bunch = load_iris()
    rng = np.random.default_rng(0)
    X = np.concatenate([bunch.data + rng.normal(0, 0.05, bunch.data.shape) for _ in range(copies)])
    y = np.concatenate([bunch.target] * copies)
    names = [f"f{i}" for i in range(4)]
    csv = tmp_path / "iris.csv"
    lines = [",".join([*names, "species"])]
    lines += [
        ",".join([*(repr(float(v)) for v in row), str(t)]) for row, t in zip(X, y, strict=True)
    ]
    csv.write_text("\n".join(lines) + "\n")
    table = pa.table({**{n: X[:, j] for j, n in enumerate(names)}, "species": y.astype(str)})
    pq.write_table(table, tmp_path / "iris.parquet", row_group_size=100)
    return str(csv), str(tmp_path / "iris.parquet")


def test_streamed_moments_equal_numpy() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(2008, 0.8, size=(1000, 3))
    moments = stream.Moments(3)
    for start in range(0, 1000, 97):
        moments.add(X[start : start + 97])
    np.testing.assert_allclose(moments.mean, X.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(moments.variance(), X.var(axis=0), rtol=1e-10)


def test_the_hash_split_is_stable_and_has_the_asked_sizes() -> None:
    X = np.random.default_rng(2).standard_normal((20000, 5))
    codes = stream.row_split(X, 0.2, 0.1)
    order = np.random.default_rng(3).permutation(len(X))
    np.testing.assert_array_equal(stream.row_split(X[order], 0.2, 0.1), codes[order])
    np.testing.assert_array_equal(stream.row_split(X.astype(np.float32), 0.2, 0.1), codes)
    fractions = np.bincount(codes, minlength=3) / len(X)
    np.testing.assert_allclose(fractions, [0.72, 0.08, 0.2], atol=0.015)


def test_csv_and_parquet_stream_the_same_data_set(tmp_path) -> None:
    csv, parquet = _iris_files(tmp_path)
    config = TrainConfig(label="species")
    scans = [stream.scan(stream.open_source(p, config, 128), config) for p in (csv, parquet)]
    assert scans[0].class_names == scans[1].class_names == ["0", "1", "2"]
    assert scans[0].counts == scans[1].counts
    np.testing.assert_allclose(scans[0].mean, scans[1].mean, rtol=1e-13)  # other chunk sizes
    assert scans[0].fingerprint == scans[1].fingerprint
    data = load_dataset(csv, "species")  # the in-memory loader fingerprints the same data alike
    assert fingerprint(data.X, data.y, data.class_names) == scans[0].fingerprint
    train_rows = stream.row_split(data.X, 0.2, 0.1) == stream.TRAIN
    np.testing.assert_allclose(scans[0].mean, data.X[train_rows].mean(axis=0), rtol=1e-12)


def test_population_statistics_equal_the_in_memory_ones(tmp_path) -> None:
    csv, _ = _iris_files(tmp_path)
    config = TrainConfig(label="species", hidden=(8, 6))
    source = stream.open_source(csv, config, 64)
    info = stream.scan(source, config)
    spec = NetworkSpec(n_features=4, n_classes=3, hidden=(8, 6))
    params = init_params(spec, np.random.default_rng(0))
    streamed = stream.population_statistics_stream(spec, params, source, info, config)
    data = load_dataset(csv, "species")
    keep = stream.row_split(data.X, 0.2, 0.1) == stream.TRAIN
    expected = population_statistics(spec, params, (data.X[keep] - info.mean) / info.std)
    for key, value in expected.items():
        np.testing.assert_allclose(streamed[key], value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_train_stream_trains_evaluates_and_converts(tmp_path, kind: str, capsys) -> None:
    csv, parquet = _iris_files(tmp_path)
    data = csv if kind == "csv" else parquet
    out = tmp_path / "run"
    args = ["train", data, "--label", "species", "--stream", "--chunk-rows", "64"]
    assert main([*args, "--out", str(out), "--epochs", "30", "--population-stats"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.85 and metrics["stats"] == "population"
    ckpt = load_checkpoint(out / "checkpoint.npz")
    assert ckpt.config["stream"] is True and ckpt.feature_names == ["f0", "f1", "f2", "f3"]
    capsys.readouterr()
    assert main(["evaluate", str(out / "checkpoint.npz"), csv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rows_scored"] == metrics["n_test"]
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert main(["convert", str(out / "checkpoint.npz"), "-o", str(tmp_path / "m.onnx"), "-q"]) == 0
    metadata = {
        p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props
    }  # the profile the service checks requests against
    profile = json.loads(metadata["bnserve.profile"])
    assert [e["name"] for e in profile["inputs"]] == ["f0", "f1", "f2", "f3"]
    assert profile["inputs"][0]["count"] == metrics["n_train"]


def test_stream_refuses_what_it_cannot_read(tmp_path, capsys) -> None:
    path = tmp_path / "text.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},x{i % 3},{i % 2}\n" for i in range(50)))
    assert main(["train", str(path), "--stream", "--out", str(tmp_path / "o")]) == 2
    assert "numeric feature columns only" in capsys.readouterr().err


def test_the_streamed_profile_is_the_training_rows_profile(tmp_path, monkeypatch) -> None:
    """Count, mean, std, min and max equal the in-memory profile of the same (hashed) training
    rows; with every training row in the sample, the deciles too; with a smaller sample they are
    a sample's, the same whatever the row order."""
    from bnserve.models.profile import profile_of_features

    csv, _ = _iris_files(tmp_path)
    config = TrainConfig(epochs=1, hidden=(8,))
    source = stream.open_source(csv, config, 64)
    X = np.concatenate([chunk for chunk, _ in source.chunks()])
    train = stream.row_split(X, config.test_split, config.val_split) == stream.TRAIN
    expected = profile_of_features(X[train], source.features)
    got = stream.scan(source, config).profile
    assert got["quantiles"] == expected["quantiles"]
    for g, e in zip(got["inputs"], expected["inputs"], strict=True):
        assert g["count"] == e["count"] and g["min"] == e["min"] and g["max"] == e["max"]
        np.testing.assert_allclose([g["mean"], g["std"]], [e["mean"], e["std"]], rtol=1e-12)
        np.testing.assert_allclose(g["quantiles"], e["quantiles"], rtol=1e-12)

    monkeypatch.setattr("bnserve.models.profile.SAMPLE_ROWS", 50)
    sampled = stream.scan(source, config).profile
    lines = Path(csv).read_text().splitlines()
    rng = np.random.default_rng(1)
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text("\n".join([lines[0], *rng.permutation(lines[1:])]) + "\n")
    reordered = stream.scan(stream.open_source(str(shuffled), config, 64), config).profile
    for a, b in zip(sampled["inputs"], reordered["inputs"], strict=True):
        assert a["quantiles"] == b["quantiles"] and a["min"] == b["min"]  # the same sample
        np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-12)  # summed in another order
    first = sampled["inputs"][0]
    assert first["count"] == expected["inputs"][0]["count"]  # exact, not the sample's size
    assert first["quantiles"] != expected["inputs"][0]["quantiles"]  # a 50-row sample's
    assert first["min"] <= first["quantiles"][0] <= first["quantiles"][-1] <= first["max"]


def test_stream_reads_quoted_cells_with_line_breaks_across_blocks(tmp_path, monkeypatch) -> None:
    """A quoted label holding a line break, in a file read in blocks far smaller than it: the
    blocks are never cut inside the cell."""
    from bnserve.models import reading

    monkeypatch.setattr(reading, "BLOCK_BYTES", 64)
    rng = np.random.default_rng(0)
    lines = ["a,b,kind"]
    for i in range(200):
        label = '"two\nlines"' if i % 2 else "one"
        lines.append(f"{rng.normal() + i % 2:.5f},{rng.normal():.5f},{label}")
    path = tmp_path / "quoted.csv"
    path.write_text("\n".join(lines) + "\n")
    config = TrainConfig(epochs=1, hidden=(4,))
    source = stream.open_source(str(path), config, 32)
    labels = [t for _, chunk in source.chunks() for t in chunk]
    assert len(labels) == 200 and set(labels) == {"one", "two\nlines"}
