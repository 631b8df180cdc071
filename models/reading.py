"""Reading a training table at library speed: CSV with pyarrow's streaming reader, Parquet with
pyarrow.parquet, both block by block into arrays allocated once.

pyarrow parses each column in native code (no Python float per cell); README ("Large files")
has the measured speed and memory next to pandas. Numeric columns come back as
numpy arrays (float32 when the model trains in float32, NaN for a missing cell), every other
column as text, as models/tabular.py types them. The header is read first with the csv module,
so duplicate names, an empty file and a header without rows keep their messages; when pyarrow
rejects the body (a ragged row, bad UTF-8) the failing row is found afterwards by a streaming
re-scan, never by parsing the whole file in Python first.
"""

from __future__ import annotations

import csv
import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from bnserve.errors import DataError

Column = np.ndarray | list[str]


@dataclass
class Table:
    """A file's columns: numeric ones as float arrays (NaN = missing), others as text."""

    names: list[str]
    columns: list[Column]
    n_rows: int
    # The `[rows, k]` array the numeric columns are views of, and their names in its order: a
    # data set whose features are exactly these columns uses it as X without a copy.
    numeric_block: np.ndarray | None = None
    numeric_names: tuple[str, ...] = ()


def read_header(path: Path) -> list[str]:
    """The first non-blank line's fields, stripped; refuses what has no usable header."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for row in csv.reader(f):
                if any(cell.strip() for cell in row):
                    header = [h.strip() for h in row]
                    break
            else:
                raise DataError(f"{path}: the file is empty")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text CSV file ({e})") from e
    if len(set(header)) != len(header):
        raise DataError(f"{path}: duplicate column names in the header")
    return header


#: Bytes pyarrow parses at a time: the reader holds about one block, whatever the file's size.
BLOCK_BYTES = 4 << 20  # smaller blocks parse no slower and keep the reader's memory small


def read_csv(
    path: Path, missing_values: tuple[str, ...], text_columns: tuple[str, ...], dtype: np.dtype
) -> Table:
    """Every column of a CSV; `text_columns` (the label) are always read as text.

    Streamed block by block into arrays allocated once (the row count is bounded by a count of
    line breaks first), so the peak memory is the final arrays plus one block. Column types are
    inferred from the first block; a column that turns out not to be numeric further down is read
    again as text (a categorical column, models/tabular.py)."""
    header = read_header(path)
    text = set(text_columns)
    while True:
        try:
            return _stream_csv(path, header, missing_values, text, dtype)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            failed = _failed_column(exc, header)
            if failed is None or failed in text:
                raise _explain(path, header, exc) from None
            text.add(failed)
        except UnicodeDecodeError as exc:
            raise _explain(path, header, exc) from None


def _stream_csv(
    path: Path, header: list[str], missing_values: tuple[str, ...], text: set[str], dtype: np.dtype
) -> Table:
    read = pacsv.ReadOptions(
        column_names=header, skip_rows=header_line(path) + 1, block_size=BLOCK_BYTES
    )
    convert = pacsv.ConvertOptions(
        null_values=list(missing_values),
        strings_can_be_null=True,
        true_values=[],  # "1"/"0" stay numbers; true/false stay text (models/tabular.py types them)
        false_values=[],
        column_types={name: pa.string() for name in text},
    )
    reader = pacsv.open_csv(path, read_options=read, convert_options=convert)
    schema = reader.schema
    numeric = [i for i, f in enumerate(schema) if _is_number(f.type) or pa.types.is_null(f.type)]
    texts: dict[int, list[str]] = {i: [] for i in range(len(header)) if i not in numeric}
    missing_text = missing_values[0] if missing_values else ""
    block = np.empty((0, len(numeric)), dtype=dtype)
    rows = 0
    size = path.stat().st_size
    for batch in reader:
        n = batch.num_rows
        if rows + n > len(block):
            # rows per block so far, times the blocks in the file, and 10% more: one allocation
            # for a regular file, a copy only when later rows are much shorter
            estimate = int((rows + n) * max(1.0, size / ((rows + n) / n * BLOCK_BYTES)) * 1.1)
            block = _grow(block, max(estimate, rows + n, int(len(block) * 1.5)))
        for k, i in enumerate(numeric):
            fill_floats(block[rows : rows + n, k], batch.column(i))
        for i, out in texts.items():
            out.extend(_texts(pa.chunked_array([batch.column(i)]), missing_text))
        rows += n
    if rows == 0:
        raise DataError(f"{path}: only a header row, no data")
    columns: list[Column] = [[] for _ in header]
    for k, i in enumerate(numeric):
        columns[i] = block[:rows, k]
    for i, out in texts.items():
        columns[i] = out
    return Table(header, columns, rows, block[:rows], tuple(header[i] for i in numeric))


def _grow(block: np.ndarray, rows: int) -> np.ndarray:
    grown = np.empty((rows, block.shape[1]), dtype=block.dtype)
    grown[: len(block)] = block
    return grown


def _failed_column(exc: Exception, header: list[str]) -> str | None:
    """The column a conversion error names ("In CSV column #3: ..."), if any."""
    match = re.search(r"In CSV column #(\d+)", str(exc))
    if match is None or int(match.group(1)) >= len(header):
        return None
    return header[int(match.group(1))]


def read_parquet(path: Path, missing_values: tuple[str, ...], dtype: np.dtype) -> Table:
    """Every column of a Parquet file (numbers stay numbers, strings are text), read batch by
    batch into arrays allocated once (the row count is in the file's metadata)."""
    import pyarrow.parquet as pq

    try:
        source = pq.ParquetFile(path)
        schema = source.schema_arrow
        rows = source.metadata.num_rows
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    if rows == 0:
        raise DataError(f"{path}: no rows")
    names = [str(n).strip() for n in schema.names]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: duplicate column names")
    numeric = [i for i, f in enumerate(schema) if _is_number(f.type)]
    block = np.empty((rows, len(numeric)), dtype=dtype)
    texts: dict[int, list[str]] = {i: [] for i in range(len(names)) if i not in numeric}
    missing_text = missing_values[0] if missing_values else ""
    start = 0
    try:
        for batch in source.iter_batches(batch_size=1 << 16):
            n = batch.num_rows
            for k, i in enumerate(numeric):
                fill_floats(block[start : start + n, k], batch.column(i))
            for i, out in texts.items():
                # booleans, dates, dictionaries...: as text, typed by models/tabular.py
                out.extend(_texts(pa.chunked_array([batch.column(i)]), missing_text))
            start += n
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    columns: list[Column] = [[] for _ in names]
    for k, i in enumerate(numeric):
        columns[i] = block[:, k]
    for i, out in texts.items():
        columns[i] = out
    return Table(names, columns, rows, block, tuple(names[i] for i in numeric))


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def _texts(column: pa.ChunkedArray, missing_text: str) -> list[str]:
    """A column as stripped text, null as `missing_text`; through the distinct values, since a
    label column of a million rows holds a handful of texts."""
    encoded = column.cast(pa.string()).combine_chunks().dictionary_encode()
    texts = [missing_text if v is None else v.strip() for v in encoded.dictionary.to_pylist()]
    indices = encoded.indices.fill_null(len(texts)).cast(pa.int64()).to_pylist()
    texts.append(missing_text)
    return [texts[i] for i in indices]


def fill_floats(out: np.ndarray, array: pa.Array) -> None:
    """Copy a numeric pyarrow array into `out` (NaN for null) straight from its data buffer
    (pyarrow's own to_numpy imports pandas, a second or so per process)."""
    if pa.types.is_null(array.type):  # every cell missing
        out[:] = np.nan
        return
    if array.type != pa.float64():
        array = array.cast(pa.float64())
    if array.null_count:
        array = pc.fill_null(array, float("nan"))
    data = np.frombuffer(array.buffers()[1], dtype=np.float64, count=array.offset + len(array))
    out[:] = data[array.offset :]


def header_line(path: Path) -> int:
    """How many physical lines precede the header (blank lines at the top of the file)."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        for index, line in enumerate(f):
            if line.strip().strip(","):
                return index
    return 0


def _explain(path: Path, header: list[str], exc: Exception) -> DataError:
    """The row pyarrow refused, found by streaming the file through the csv module."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            lines = (r for r in rows if any(cell.strip() for cell in r))
            for number, row in enumerate(itertools.islice(lines, 1, None), start=2):
                if len(row) != len(header):
                    return DataError(
                        f"{path}: row {number} has {len(row)} fields, expected {len(header)} "
                        "(ragged row)"
                    )
    except UnicodeDecodeError as e:
        return DataError(f"{path}: not a UTF-8 text CSV file ({e})")
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DataError(f"{path}: cannot parse as CSV ({first})")


def column_text(column: Column, missing_text: str = "") -> list[str]:
    """A column as text: whole numbers as integers ("2007", as a CSV writes a code), others in
    their shortest float form, NaN as `missing_text`."""
    if isinstance(column, list):
        return column
    return [
        missing_text if v != v else str(int(v)) if float(v).is_integer() else repr(float(v))
        for v in column.tolist()
    ]
