"""Reading training data at library speed (models/reading.py): CSV streamed through pyarrow and
Parquet give the same data set as the CSV module would, errors still name file, row and column,
and a column that stops being numeric far down the file becomes a categorical column."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bnserve.errors import DataError
from bnserve.models import reading
from bnserve.models.data import load_dataset


def _frame(n: int = 300, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 4)) * [1, 10, 100, 1e-3]
    y = [("cat", "dog", "bird")[i % 3] for i in range(n)]
    return X, y


def _write_csv(path, X, y, names=("a", "b", "c", "d")) -> str:
    lines = [",".join([*names, "label"])]
    lines += [
        ",".join([*(repr(float(v)) for v in row), lab]) for row, lab in zip(X, y, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_csv_and_parquet_give_the_same_data_set(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(reading, "BLOCK_BYTES", 4096)  # many blocks, and the arrays grow
    X, y = _frame()
    csv = load_dataset(_write_csv(tmp_path / "d.csv", X, y))
    table = pa.table({"a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "d": X[:, 3], "label": y})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=50)
    parquet = load_dataset(str(tmp_path / "d.parquet"))
    np.testing.assert_array_equal(csv.X, X)  # repr round-trips every float64 exactly
    np.testing.assert_array_equal(parquet.X, X)
    assert csv.class_names == parquet.class_names == ["bird", "cat", "dog"]
    np.testing.assert_array_equal(csv.y, parquet.y)
    as32 = load_dataset(str(tmp_path / "d.csv"), dtype=np.float32)
    assert as32.X.dtype == np.float32
    np.testing.assert_array_equal(as32.X, X.astype(np.float32))


def test_a_column_that_turns_to_text_far_down_is_categorical(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(reading, "BLOCK_BYTES", 4096)
    rows = [f"{i % 5},{'xy'[i % 2]}" for i in range(2000)] + ["unknown,x"]
    path = tmp_path / "late.csv"
    path.write_text("a,label\n" + "\n".join(rows) + "\n")
    data = load_dataset(str(path))
    assert data.preprocessor.columns[0].kind == "categorical"


def test_errors_name_the_row_and_column(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(reading, "BLOCK_BYTES", 4096)
    body = "".join(f"{i},{i % 3},{'xy'[i % 2]}\n" for i in range(1000))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b,label\n" + body + "1,2\n" + body)
    with pytest.raises(DataError, match=r"row 1002 has 2 fields, expected 3"):
        load_dataset(str(ragged))
    infinite = tmp_path / "inf.csv"
    infinite.write_text("a,b,label\n" + body + "inf,1,x\n")
    with pytest.raises(DataError, match=r"row 1002, column 'a': 'inf' is not a finite number"):
        load_dataset(str(infinite))
    binary = tmp_path / "bad.csv"
    binary.write_bytes(b"a,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="UTF-8"):
        load_dataset(str(binary))
