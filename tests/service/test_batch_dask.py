"""`bnserve predict --dask`: many CSV and Parquet files scored on a Dask LocalCluster of two
single-threaded worker processes give the numbers single-process `predict` gives file by file;
each worker loads the model once; an error in a piece that starts mid-file names the file, the
line and the column and leaves no output."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bnserve.cli import main
from bnserve.errors import DataError
from tests.service.support import FEATURE_NAMES, build_mlp_classifier, read_predictions

distributed = pytest.importorskip("distributed", reason="the 'dask' extra")
batch = pytest.importorskip("bnserve.service.batch")


@pytest.fixture(scope="module")
def client() -> Iterator[distributed.Client]:
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        yield client


def _csv(path: Path, x: np.ndarray, header: bool = True) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(["target", *FEATURE_NAMES])
        for i, row in enumerate(x):
            cells = [repr(float(v)) for v in row]
            writer.writerow([i % 3, *cells] if header else cells)
    return path


def _single_process(model: Path, files: list[Path], tmp: Path) -> tuple[list, np.ndarray]:
    labels, probs = [], []
    for i, data in enumerate(files):
        out = tmp / f"single{i}.csv"
        assert main(["predict", str(model), str(data), "-o", str(out), "--chunk-rows", "64"]) == 0
        _, lab, _, p = read_predictions(out)
        labels += lab
        probs.append(p)
    return labels, np.concatenate(probs)


def _parts(out: Path) -> tuple[list, np.ndarray]:
    labels, probs = [], []
    for part in sorted(out.iterdir()):
        _, lab, _, p = read_predictions(part)
        labels += lab
        probs.append(p)
    return labels, np.concatenate(probs)


def test_dask_gives_the_numbers_of_single_process_predict(
    client: distributed.Client, tmp_path: Path
) -> None:
    model = build_mlp_classifier(tmp_path / "m.onnx", seed=11)
    rng = np.random.default_rng(12)
    data = tmp_path / "data"
    data.mkdir()
    x = rng.normal(size=(600, len(FEATURE_NAMES))).astype(np.float32)
    pq.write_table(
        pa.table({n: x[:200, j] for j, n in enumerate(FEATURE_NAMES)}),
        data / "a.parquet",
        row_group_size=70,  # three row groups: three partitions
    )
    _csv(data / "b.csv", x[200:450])
    _csv(data / "c.csv", x[450:], header=False)  # columns by position
    (data / "_SUCCESS").write_text("")  # markers other tools write are left out
    files = sorted(p for p in data.iterdir() if not p.name.startswith("_"))
    ref = batch.ModelRef.of(model, "m", 1)
    out = tmp_path / "out"
    # about 4 KB of CSV per partition: b.csv and c.csv are cut into pieces mid-file
    result = batch.predict_dask(ref, data, out, client, partition_bytes=4096, chunk_rows=50)
    assert (result.rows, result.files, result.workers) == (600, 3, 2)
    assert result.parts > 6 and len(list(out.iterdir())) == result.parts
    labels, probs = _parts(out)
    expected_labels, expected = _single_process(model, files, tmp_path)
    assert labels == expected_labels
    np.testing.assert_array_equal(probs, expected)
    # a second job (a glob, Parquet parts) replaces the first one's folder, on the same sessions
    second = batch.predict_dask(ref, str(data / "*.csv"), out, client, partition_bytes=2048)
    assert second.rows == 400 and all(p.suffix == ".csv" for p in out.iterdir())
    parquet_out = tmp_path / "out.parquet"
    batch.predict_dask(ref, data, parquet_out, client)
    assert {p.suffix for p in parquet_out.iterdir()} == {".parquet"}
    np.testing.assert_array_equal(_parts(parquet_out)[1], expected)
    loads = client.run(batch.model_loads)
    assert len(loads) == 2
    assert all(n == 1 for per_worker in loads.values() for n in per_worker.values()), loads
    assert sum(len(per_worker) for per_worker in loads.values()) >= 1


def test_dask_raw_column_model(client: distributed.Client, raw_model: Path, tmp_path: Path) -> None:
    data = tmp_path / "raw"
    data.mkdir()
    rows = [["1.5", "yes", "red"], ["", "no", "blue"], [" -0.25 ", "Y", ""], ["NA", "0", "pink"]]
    for name, repeat in (("a.csv", 30), ("b.csv", 45)):
        with (data / name).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["color", "flag", "size"])
            for i in range(repeat):
                size, flag, color = rows[i % len(rows)]
                writer.writerow([color, flag, size])
    out = tmp_path / "out"
    ref = batch.ModelRef.of(raw_model, "raw", 1)
    batch.predict_dask(ref, data, out, client, partition_bytes=256, chunk_rows=7)
    labels, probs = _parts(out)
    expected_labels, expected = _single_process(raw_model, sorted(data.iterdir()), tmp_path)
    assert labels == expected_labels
    np.testing.assert_array_equal(probs, expected)


def test_an_error_mid_file_names_the_line_and_leaves_no_output(
    client: distributed.Client, tmp_path: Path
) -> None:
    model = build_mlp_classifier(tmp_path / "m.onnx", seed=13)
    data = tmp_path / "data"
    data.mkdir()
    x = np.random.default_rng(14).normal(size=(500, len(FEATURE_NAMES))).astype(np.float32)
    path = _csv(data / "bad.csv", x)
    lines = path.read_text().splitlines()
    lines[399] = lines[399].rsplit(",", 1)[0] + ",oops"  # line 400, the last column
    lines.insert(200, "")  # a blank line earlier: not a row, not counted
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    ref = batch.ModelRef.of(model, "m", 1)
    with pytest.raises(DataError, match=r"bad\.csv: line 400, column 'f7': 'oops' is not a number"):
        batch.predict_dask(ref, data, out, client, partition_bytes=4096)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "m.onnx"]


def test_predict_dask_local_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    model = build_mlp_classifier(tmp_path / "m.onnx", seed=15)
    x = np.random.default_rng(16).normal(size=(30, len(FEATURE_NAMES))).astype(np.float32)
    data = _csv(tmp_path / "one.csv", x)
    out = tmp_path / "preds.parquet"
    argv = ["predict", str(model), str(data), "-o", str(out), "--dask", "local"]
    assert main([*argv, "--dask-workers", "1"]) == 0
    assert "30 rows of 1 file(s) scored with m v1 on 1 Dask worker(s)" in capsys.readouterr().out
    assert [p.name for p in out.iterdir()] == ["part-00000.parquet"]
    assert main(["predict", str(model), str(data), "-o", "-", "--dask", "local"]) == 2
    assert "standard output" in capsys.readouterr().err
