"""`bnserve predict` at data scale: CSV and Parquet read and written chunk by chunk, errors in a
later chunk, atomic output, memory that does not grow with the file, plain and raw-column
models."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from bnserve.cli import main
from tests.service.support import (
    FEATURE_NAMES,
    LABELS,
    build_mlp_classifier,
    read_predictions,
    reference_run,
)


def write_features(path: Path, x: np.ndarray, extra: dict[str, list] | None = None) -> Path:
    """The rows of `x` under FEATURE_NAMES (plus `extra` columns first) as CSV or Parquet."""
    columns = {**(extra or {}), **{n: x[:, j] for j, n in enumerate(FEATURE_NAMES)}}
    if path.suffix == ".parquet":
        pq.write_table(pa.table(columns), path, row_group_size=max(1, len(x) // 3))
        return path
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(list(columns))
        for i in range(len(x)):
            writer.writerow([columns[c][i] for c in columns])
    return path


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return build_mlp_classifier(tmp_path / "m.onnx", seed=3)


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, len(FEATURE_NAMES))).astype(np.float32)


# --- chunks --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tiny_chunks_give_the_numbers_of_one_chunk(
    model: Path, tmp_path: Path, suffix: str
) -> None:
    x = _x(500)
    data = write_features(tmp_path / f"data{suffix}", x, {"id": list(range(500))})
    outputs = {}
    for chunk, threads in (("1000000", "2"), ("7", "1"), ("1", "2")):
        out = tmp_path / f"out_{chunk}.csv"
        argv = ["predict", str(model), str(data), "-o", str(out), "--chunk-rows", chunk]
        assert main([*argv, "--threads", threads]) == 0
        outputs[chunk] = read_predictions(out)
    header, labels, index, probs = outputs["1000000"]
    assert header == ["label", "class_index", "p_cat", "p_dog", "p_bird"]
    for other in ("7", "1"):
        assert outputs[other][1] == labels
        np.testing.assert_array_equal(outputs[other][2], index)
        np.testing.assert_array_equal(outputs[other][3], probs)
    expected = reference_run(model, x)
    np.testing.assert_allclose(probs, expected, rtol=1e-6, atol=1e-7)
    assert labels == [LABELS[i] for i in expected.argmax(axis=1)]


def test_parquet_in_and_out_agree_with_csv(model: Path, tmp_path: Path) -> None:
    x = _x(300, seed=1)
    ints = np.arange(300) % 7 - 3  # an integer column is read as numbers
    x[:, 2] = ints
    table = pa.table(
        {
            "note": [f"row {i}" for i in range(300)],  # a text column the model does not read
            **{n: x[:, j] for j, n in enumerate(FEATURE_NAMES) if j != 2},
            FEATURE_NAMES[2]: pa.array(ints, type=pa.int64()),
        }
    )
    data = tmp_path / "data.parquet"
    pq.write_table(table, data, row_group_size=64)
    assert main(["predict", str(model), str(data), "-o", str(tmp_path / "out.parquet")]) == 0
    assert main(["predict", str(model), str(data), "-o", str(tmp_path / "out.csv")]) == 0
    written = pq.read_table(tmp_path / "out.parquet")
    assert written.schema.names == ["label", "class_index", "p_cat", "p_dog", "p_bird"]
    assert [str(t) for t in written.schema.types] == ["string", "int64"] + ["float"] * 3
    from_parquet, from_csv = (read_predictions(tmp_path / n) for n in ("out.parquet", "out.csv"))
    assert from_parquet[1] == from_csv[1]
    np.testing.assert_array_equal(from_parquet[3], from_csv[3])  # CSV numbers round-trip
    np.testing.assert_allclose(from_parquet[3], reference_run(model, x), rtol=1e-6, atol=1e-7)


def test_standard_output_streams_csv_from_parquet(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = write_features(tmp_path / "data.parquet", _x(50, seed=2))
    assert main(["predict", str(model), str(data), "-o", "-", "--chunk-rows", "8"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "label,class_index,p_cat,p_dog,p_bird" and len(lines) == 51
    assert "50 rows scored" in captured.err


def test_csv_quirks_read_like_the_csv_module(model: Path, tmp_path: Path) -> None:
    """A byte-order mark, blank lines, CRLF, quoted cells with commas and newlines in an ignored
    column, spaces around numbers, and Python-only number forms: same numbers at any chunk."""
    x = _x(40, seed=4)
    lines = ["note," + ",".join(FEATURE_NAMES)]
    for i, row in enumerate(x):
        cells = [repr(float(v)) for v in row]
        if i % 5 == 0:
            cells[1] = f" {cells[1]} "  # pyarrow refuses the spaces, float() reads them
        note = f'"line one, {i}\r\nline ""two"""' if i % 3 == 0 else f"n{i}"
        lines.append(note + "," + ",".join(cells))
        if i % 7 == 0:
            lines.append("")
    data = tmp_path / "quirks.csv"
    data.write_bytes(b"\xef\xbb\xbf\r\n" + "\r\n".join(lines).encode() + b"\r\n")
    outputs = []
    for chunk in ("1", "3", "1000"):
        out = tmp_path / f"out{chunk}.csv"
        assert main(["predict", str(model), str(data), "-o", str(out), "--chunk-rows", chunk]) == 0
        outputs.append(read_predictions(out)[3])
    for probs in outputs:
        np.testing.assert_allclose(probs, reference_run(model, x), rtol=1e-6, atol=1e-7)


def test_labels_that_need_quotes_are_quoted(tmp_path: Path) -> None:
    labels = ["a,b", 'say "hi"', "plain"]
    model = build_mlp_classifier(tmp_path / "q.onnx", seed=9, labels=labels)
    data = write_features(tmp_path / "data.csv", _x(30, seed=9))
    out = tmp_path / "out.csv"
    assert main(["predict", str(model), str(data), "-o", str(out)]) == 0
    header, written, index, _ = read_predictions(out)
    assert header == ["label", "class_index", "p_a,b", 'p_say "hi"', "p_plain"]
    assert written == [labels[i] for i in index] and len(written) == 30


# --- errors and atomic output --------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["1"] * 3 + ["abc"] + ["1"] * 4, "line 1502, column 'f3': 'abc' is not a number"),
        (["1"] * 7, "line 1502, column 'f7': '(missing)' is not a number"),
        (["1"] * 3 + ["inf"] + ["1"] * 4, "line 1502, column 'f3' is inf: row 1500 has NaN"),
    ],
)
@pytest.mark.parametrize("out_name", ["out.csv", "out.parquet"])
def test_a_bad_cell_in_a_later_chunk_names_file_line_and_column_and_keeps_the_old_output(
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    row: list[str],
    message: str,
    out_name: str,
) -> None:
    x = _x(2000, seed=5)
    data = tmp_path / "bad.csv"
    lines = [",".join(FEATURE_NAMES)] + [",".join(map(repr, map(float, r))) for r in x]
    lines[1501] = ",".join(row)  # data row 1500, line 1502 counting the header
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / out_name
    out.write_bytes(b"the previous output\n")
    argv = ["predict", str(model), str(data), "-o", str(out), "--chunk-rows", "100"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{data}: {message}" in err
    assert out.read_bytes() == b"the previous output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.csv", "m.onnx", out_name]


def test_a_null_in_a_later_parquet_batch_names_the_row_and_column(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    x = _x(1000, seed=6)
    columns = {n: pa.array(x[:, j]) for j, n in enumerate(FEATURE_NAMES)}
    f5 = x[:, 5].tolist()
    f5[900] = None
    columns["f5"] = pa.array(f5, type=pa.float32())
    data = tmp_path / "nulls.parquet"
    pq.write_table(pa.table(columns), data, row_group_size=250)
    out = tmp_path / "out.csv"
    argv = ["predict", str(model), str(data), "-o", str(out), "--chunk-rows", "64"]
    assert main(argv) == 2
    assert f"{data}: row 901, column 'f5': missing value (null)" in capsys.readouterr().err
    assert not out.exists()


def test_bad_inputs_are_named(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    out = str(tmp_path / "out.csv")
    assert main(["predict", str(model), str(junk), "-o", out]) == 2
    assert "not a readable Parquet file" in capsys.readouterr().err
    latin = tmp_path / "latin.csv"
    latin.write_bytes((",".join(FEATURE_NAMES) + "\n" + "1," * 7 + "\xe9\n").encode("latin-1"))
    assert main(["predict", str(model), str(latin), "-o", out]) == 2
    assert "not a UTF-8 text CSV file (line 2:" in capsys.readouterr().err
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")
    assert main(["predict", str(model), str(empty), "-o", out]) == 2
    assert "empty CSV file" in capsys.readouterr().err
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(FEATURE_NAMES))
    assert main(["predict", str(model), str(header_only), "-o", out]) == 0
    assert Path(out).read_text() == "label,class_index,p_cat,p_dog,p_bird\n"


# --- memory --------------------------------------------------------------------------------

# Scores a file and prints the process's peak resident memory in KiB: VmHWM belongs to the
# process image since its exec, so it does not count the pytest process it was started from.
MEASURE = """
import sys
from bnserve.cli import main
code = main(sys.argv[1:])
status = open("/proc/self/status").read()
print(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM:")))
sys.exit(code)
"""


def _peak_kib(argv: list[str]) -> int:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *argv], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_peak_memory_does_not_grow_with_the_file(model: Path, tmp_path: Path) -> None:
    """250,000 rows against 1,000,000 (87 MB of CSV text; 32 MB as float32 and about a GB as the
    Python lists a csv-module reader holds), 2,000 rows a chunk, CSV to Parquet and Parquet to
    CSV: four times the rows, the same peak. (The peak itself is start-up, onnxruntime and
    pyarrow's fixed buffers: reached after a few chunks, then flat.)"""
    rng = np.random.default_rng(7)
    schema = pa.schema([(n, pa.float32()) for n in FEATURE_NAMES])
    for name, rows in (("quarter", 250_000), ("full", 1_000_000)):
        with (
            pacsv.CSVWriter(tmp_path / f"{name}.csv", schema) as csv_writer,
            pq.ParquetWriter(tmp_path / f"{name}.parquet", schema) as parquet_writer,
        ):
            for _ in range(rows // 50_000):
                x = rng.normal(size=(50_000, len(FEATURE_NAMES))).astype(np.float32)
                table = pa.Table.from_arrays(list(x.T), schema=schema)
                csv_writer.write_table(table)
                parquet_writer.write_table(table)
    assert (tmp_path / "full.csv").stat().st_size > 80e6
    peaks = {}
    for name in ("quarter", "full"):
        for source, target in ((".csv", ".parquet"), (".parquet", ".csv")):
            data, out = tmp_path / f"{name}{source}", tmp_path / f"out{target}"
            argv = ["predict", str(model), str(data), "-o", str(out), "--chunk-rows", "2000"]
            peaks[name, source] = _peak_kib(argv)
    for source in (".csv", ".parquet"):
        growth_mb = (peaks["full", source] - peaks["quarter", source]) / 1024
        assert growth_mb < 16, (source, peaks)
    assert read_predictions(tmp_path / "out.parquet")[3].shape == (1_000_000, 3)


# --- raw-column models ---------------------------------------------------------------------


RAW_ROWS = [
    ["1.5", "yes", "red"],
    ["", "no", "blue"],
    [" -0.25 ", "Y", ""],
    ["NA", "false", "purple"],  # a missing number and a category never seen in training
    ["3", "1", "green"],
]


def _raw_csv(path: Path, repeat: int) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "color", "flag", "size"])  # another order, an extra column
        for i in range(repeat):
            for row in RAW_ROWS:
                writer.writerow([i, row[2], row[1], row[0]])
    return path


def test_raw_column_model_streams_csv_and_parquet(raw_model: Path, tmp_path: Path) -> None:
    data = _raw_csv(tmp_path / "raw.csv", 40)
    outputs = {}
    for chunk in ("1000", "3"):
        out = tmp_path / f"out{chunk}.csv"
        argv = ["predict", str(raw_model), str(data), "-o", str(out), "--chunk-rows", chunk]
        assert main(argv) == 0
        outputs[chunk] = read_predictions(out)[3]
    np.testing.assert_array_equal(outputs["3"], outputs["1000"])
    # the same rows as a Parquet file the way pandas writes one: numbers (NaN missing),
    # booleans, text with nulls
    n = 40 * len(RAW_ROWS)
    table = pa.table(
        {
            "size": pa.array([1.5, None, -0.25, float("nan"), 3.0] * 40, type=pa.float64()),
            "flag": pa.array([True, False, True, False, True] * 40),
            "color": pa.array(["red", "blue", None, "purple", "green"] * 40),
        }
    )
    pq.write_table(table, tmp_path / "raw.parquet", row_group_size=n // 4)
    out = tmp_path / "out.parquet"
    assert main(["predict", str(raw_model), str(tmp_path / "raw.parquet"), "-o", str(out)]) == 0
    np.testing.assert_array_equal(read_predictions(out)[3], outputs["1000"])


def test_raw_column_errors_name_the_line_and_column(
    raw_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = _raw_csv(tmp_path / "raw.csv", 40)
    lines = data.read_text().splitlines()
    lines[150] = "7,red,maybe,big"
    data.write_text("\n".join(lines) + "\n")
    argv = ["predict", str(raw_model), str(data), "-o", str(tmp_path / "o.csv")]
    assert main([*argv, "--chunk-rows", "10"]) == 2
    err = capsys.readouterr().err
    assert "line 151, column 'size': 'big' is not a number" in err
    assert "line 151, column 'flag'" in err and "'maybe'" in err


def test_dask_without_its_extra_says_which_to_install(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if it were not installed
    data = write_features(tmp_path / "data.csv", _x(5))
    argv = ["predict", str(model), str(data), "-o", str(tmp_path / "out"), "--dask", "local"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "needs the 'dask' extra" in err and "pip install 'bnserve[dask]'" in err
    assert not (tmp_path / "out").exists()


def test_imports_stay_lazy() -> None:
    """The `serve` command's module loads neither pyarrow nor onnxruntime (the gunicorn master
    forks workers); the scoring modules load neither the trainer, nor dask, nor pandas."""
    code = (
        "import sys, bnserve.service.cli; "
        "print(sorted(m for m in sys.modules if m.startswith(('pyarrow', 'onnxruntime')))); "
        "import bnserve.service.offline, bnserve.service.batch; "
        "print(sorted(m for m in sys.modules "
        "if m.startswith(('bnserve.models', 'sklearn', 'dask', 'distributed', 'pandas'))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.split("\n")[:2] == ["[]", "[]"]
