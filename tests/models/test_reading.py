"""Reading training data at library speed (models/reading.py): CSV streamed through pyarrow and
Parquet give the same data set as the CSV module would, errors still name file, row and column,
and a column that stops being numeric far down the file becomes a categorical column."""

from __future__ import annotations

import csv
import itertools

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


def _small_pieces(monkeypatch) -> None:
    """Many blocks and many pieces: the threads and the cuts run even on a small file."""
    monkeypatch.setattr(reading, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(reading, "PIECE_BYTES", 97)


def _no_fallback(monkeypatch) -> None:
    """Fail if a parallel parse is redone on the whole body: the cuts must be right already."""

    def refuse(*_):
        raise AssertionError("a cut split a row: the body was read again as one piece")

    monkeypatch.setattr(reading, "_whole_body", refuse)


def test_csv_and_parquet_give_the_same_data_set(tmp_path, monkeypatch) -> None:
    _small_pieces(monkeypatch)
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
    _small_pieces(monkeypatch)
    rows = [f"{i % 5},{'xy'[i % 2]}" for i in range(2000)] + ["unknown,x"]
    path = tmp_path / "late.csv"
    path.write_text("a,label\n" + "\n".join(rows) + "\n")
    data = load_dataset(str(path))
    assert data.preprocessor.columns[0].kind == "categorical"


def test_errors_name_the_row_and_column(tmp_path, monkeypatch) -> None:
    _small_pieces(monkeypatch)
    body = "".join(f"{i},{i % 3},{'xy'[i % 2]}\n" for i in range(1000))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b,label\n" + body + "1,2\n" + body)
    with pytest.raises(DataError, match=r"row 1002 has 2 fields, expected 3"):
        load_dataset(str(ragged))
    infinite = tmp_path / "inf.csv"
    infinite.write_text("a,b,label\n" + body + "inf,1,x\n")
    with pytest.raises(DataError, match=r"row 1002, column 'a': 'inf' is not a finite number"):
        load_dataset(str(infinite))
    commented = tmp_path / "commented.csv"  # as matplotlib's sample Stocks.csv begins
    commented.write_text("# Data source: somewhere\n" + "a,b,label\n" + body)
    with pytest.raises(DataError, match=r"row 2 has 3 fields, expected 1 .*header starts with '#'"):
        load_dataset(str(commented))
    binary = tmp_path / "bad.csv"
    binary.write_bytes(b"a,label\n\xff\xfe,1\n")
    with pytest.raises(DataError, match="UTF-8"):
        load_dataset(str(binary))


def _reference(path) -> tuple[list[str], list[list[str]]]:
    """The header and the columns as Python's csv module reads the file (blank lines skipped)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = [r for r in csv.reader(f) if r]
    return rows[0], [list(c) for c in zip(*rows[1:], strict=True)]


def _assert_reads_as_reference(path) -> None:
    header, expected = _reference(path)
    table = reading.read_csv(path, ("",), (), np.dtype(np.float64))
    assert table.names == header and table.n_rows == len(expected[0])
    for name, got, want in zip(header, table.columns, expected, strict=True):
        if isinstance(got, np.ndarray):
            # an empty cell is missing: NaN
            expected_numbers = [float(v) if v else np.nan for v in want]
            np.testing.assert_array_equal(got, expected_numbers, err_msg=name)
        else:
            assert got == [v.strip() for v in want], name


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r"])
def test_pieces_cut_at_line_breaks_only_outside_quoted_cells(tmp_path, monkeypatch, newline):
    """Cut into pieces smaller than a row, a file with quoted cells holding line breaks, commas
    and doubled quotes, blank lines, and any line ending reads as the csv module reads it."""
    _small_pieces(monkeypatch)
    _no_fallback(monkeypatch)
    rng = np.random.default_rng(3)
    lines = ["n,note,x,label"]
    for i in range(400):
        note = ('"two\nlines, one ""quoted"""', "plain", '"a,b"', "")[i % 4]
        lines.append(f"{i},{note},{rng.normal():.6f},{'pq'[i % 2]}")
        if i % 37 == 0:
            lines.append("")  # a blank line: fewer rows than line breaks
    path = tmp_path / "quoted.csv"
    path.write_bytes(newline.join(lines).replace("\n", newline).encode() + newline.encode())
    _assert_reads_as_reference(path)


def test_a_stray_quote_in_an_unquoted_cell_costs_speed_not_rows(tmp_path, monkeypatch) -> None:
    """A quote inside an unquoted cell (5'10") is a character, not a quote: it flips the count of
    quotes, so a cut inside a later quoted cell looks safe; the parse that fails there is redone
    on the whole body, and the rows are still right."""
    _small_pieces(monkeypatch)
    lines = ["height,note,label", "5'10\",x,a"]
    lines += [f'{i},"line\nbreak {i}",{"ab"[i % 2]}' for i in range(300)]
    path = tmp_path / "stray.csv"
    path.write_text("\n".join(lines) + "\n")
    pieces = reading._pieces(path)
    assert len(pieces) > 1  # the cuts after the stray quote are taken
    _assert_reads_as_reference(path)


def test_pieces_bound_the_rows_and_place_them_in_order(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(reading, "PIECE_BYTES", 50)
    path = tmp_path / "p.csv"
    path.write_text("\n\na,label\n" + "".join(f"{i},{i % 2}\n" for i in range(100)) + "7,1")
    pieces = reading._pieces(path)
    body = path.read_bytes()
    assert pieces[0].start == body.index(b"0,0") and pieces[-1].end == len(body)
    for before, after in itertools.pairwise(pieces):
        assert before.end == after.start and body[before.end - 1 : before.end] == b"\n"
        assert after.row == before.row + before.lines
    assert sum(p.lines for p in pieces) >= 101
    table = reading.read_csv(path, ("",), ("label",), np.dtype(np.float32))
    np.testing.assert_array_equal(table.columns[0], [*range(100), 7])
    assert table.columns[0].dtype == np.float32


def _random_csv(rng: np.random.Generator) -> bytes:
    """A CSV the way real files come: quoted cells holding commas, doubled quotes and line breaks,
    empty cells, blank lines, a byte-order mark, CRLF or LF line ends, numbers in several forms."""
    newline = ["\n", "\r\n"][rng.integers(2)]

    def cell(kind: str) -> str:
        if rng.random() < 0.08:
            return ""
        if kind == "number":
            return [f"{rng.normal():.6g}", str(int(rng.integers(-50, 50))), f"{rng.normal():e}"][
                rng.integers(3)
            ]
        text = "".join(rng.choice(list('ab ,"\n;xyz'), size=int(rng.integers(1, 8))))
        return '"' + text.replace('"', '""') + '"' if set(text) & set(',"\n') else text

    kinds = [["number", "text"][rng.integers(2)] for _ in range(int(rng.integers(2, 6)))]
    lines = [",".join(f"c{j}" for j in range(len(kinds)))]
    for _ in range(int(rng.integers(20, 200))):
        lines.append(",".join(cell(k) for k in kinds))
        if rng.random() < 0.05:
            lines.append("")
    body = newline.join(line.replace("\n", newline) for line in lines) + newline
    return ("\ufeff" if rng.random() < 0.3 else "").encode() + body.encode()


@pytest.mark.parametrize("seed", range(25))
def test_random_real_world_csvs_read_as_the_csv_module_reads_them(tmp_path, monkeypatch, seed):
    """Differential test: the parallel reader against Python's csv module on generated files."""
    _small_pieces(monkeypatch)
    _no_fallback(monkeypatch)
    path = tmp_path / "random.csv"
    path.write_bytes(_random_csv(np.random.default_rng(seed)))
    _assert_reads_as_reference(path)


def test_a_table_larger_than_the_free_memory_is_refused_with_the_way_out(tmp_path, monkeypatch):
    """Before allocating: the line-break count bounds the rows, so a file whose arrays cannot fit
    is refused with --stream named, instead of the kernel killing the process."""
    X, y = _frame(n=300)
    path = _write_csv(tmp_path / "d.csv", X, y)
    monkeypatch.setattr(reading, "available_memory", lambda: 300 * 4 * 8 - 1)
    with pytest.raises(
        DataError,
        match=r"need .* GiB as float64.*--stream` trains on it out of core \(or --dtype float32",
    ):
        load_dataset(path)
    data = load_dataset(path, dtype=np.float32)  # half of it fits
    assert data.X.shape == (300, 4)
    parquet = tmp_path / "d.parquet"
    columns = {"a": X[:, 0], "b": X[:, 1], "c": X[:, 2], "d": X[:, 3], "label": y}
    pq.write_table(pa.table(columns), parquet)
    with pytest.raises(DataError, match="--stream"):  # the row count is in its metadata
        load_dataset(str(parquet))
    monkeypatch.setattr(reading, "available_memory", lambda: None)  # not Linux: nothing to check
    assert load_dataset(path).X.shape == (300, 4)
