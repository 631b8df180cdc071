"""Table files for batch scoring: CSV and Parquet read and written in chunks with pyarrow, so the
memory `bnserve predict` needs does not grow with the file.

Reading a CSV: the file is cut into blocks of about `chunk_rows` rows (at most 8 MiB) at record
boundaries (a newline outside quotes) and pyarrow parses each block, multithreaded, straight into
float32 (or the model's raw columns as text). Where that fast parse fails (a cell that is not a number, a
ragged row, bytes that are not UTF-8), only the failing block is read again with Python's csv
module: it finds the bad cell (the error names the file, the 1-based line counting the header,
and the column) or accepts what pyarrow refused and Python's `float` reads (" 1.5", "1_000"), so
the results are those of a plain csv-module reader. Parquet files are read by record batches.

Features come out as the model's float input (`[n, F]`, float32 unless the graph takes
float64), or as one `[n, 1]` array per raw column (service/columns.py: float32 with NaN for a
missing cell, strings with "" for a missing category).

Writing: label, class_index, p_<label>... per chunk, as CSV or as Parquet (by the output's
extension). Pure functions and small classes over files: no onnxruntime here.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from bnserve.errors import BnserveError, DataError, comment_line_hint
from bnserve.service.columns import (
    BOOLEAN,
    CATEGORICAL,
    FALSE_TEXTS,
    MISSING_TEXT,
    TRUE_TEXTS,
    RawColumn,
    cell,
    text_cell,
)
from bnserve.service.config import DEFAULT_CHUNK_ROWS
from bnserve.service.metadata import ModelInfo

#: File name endings read and written as Parquet; any other name is a CSV, as for `train`.
PARQUET_SUFFIXES = (".parquet", ".pq")
_SNIFF_BYTES = 1 << 16
# Wide tables come in fewer rows per chunk than --chunk-rows: at most 8 MiB of CSV text (pyarrow
# parses it in 1 MiB blocks, in parallel) or 2 MiB of Parquet values, about 15,000 and 10,000
# rows of 50 numbers. Larger chunks cost memory (pyarrow's buffers grow with them: 4 MiB Parquet
# chunks of a 1Mi-row group of 50 columns took 30 MB more at the peak) and gain no speed.
MAX_CSV_CHUNK_BYTES = 8 << 20
MAX_PARQUET_CHUNK_BYTES = 2 << 20
# Parquet output: chunks are gathered into row groups of this many rows (a few MiB), since
# readers do better with fewer, larger row groups.
OUTPUT_ROW_GROUP_ROWS = 1 << 17
_PARSE_BLOCK_BYTES = 1 << 20
_PARQUET_BUFFER_BYTES = 1 << 18
_FLOAT32_MAX = 3.4e38  # what a raw numeric column accepts (service/columns.py `cell`)

Features = np.ndarray | dict[str, np.ndarray]


def is_parquet(path: str | Path) -> bool:
    """Whether `path` names a Parquet file (by its extension)."""
    return str(path).lower().endswith(PARQUET_SUFFIXES)


def feature_dtype(info: ModelInfo) -> np.dtype:
    """The dtype features are parsed into: the graph's float64, else float32 (float16 graphs
    get float32, cast by the runtime)."""
    return np.dtype(np.float64) if info.input.dtype == np.float64 else np.dtype(np.float32)


# --- which columns a model reads -----------------------------------------------------------


@dataclass(frozen=True)
class Selection:
    """The columns of a table a model reads, by position, and the ones it ignores."""

    positions: list[int]
    ignored: list[str]


def select_columns(header: Sequence[str], info: ModelInfo, source: str | Path) -> Selection:
    """The model's columns among a table's named columns. A raw-column model takes its columns
    by name; a plain model its features by name when it has names (other columns, such as a
    label, are ignored), else every column by position."""
    header = list(header)
    if info.columns is not None:
        missing = [c.name for c in info.columns if c.name not in header]
        if missing:
            raise DataError(
                f"{source}: the model's columns {missing} are missing (header: {header})"
                + comment_line_hint(header=header)
            )
        wanted = {c.name for c in info.columns}
        ignored = [repr(h) for h in header if h not in wanted]
        return Selection([header.index(c.name) for c in info.columns], ignored)
    n_features = info.n_features
    names = info.feature_names
    if names is not None and set(names) <= set(header):
        ignored = [h for h in header if h not in set(names)]
        return Selection([header.index(n) for n in names], ignored)
    if names is not None:
        missing = [n for n in names if n not in header]
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{source}: {len(missing)} of the model's feature columns are missing: {shown}"
            + comment_line_hint(header=header)
        )
    if len(header) != n_features:
        raise DataError(f"{source}: {len(header)} columns, the model expects {n_features} features")
    return Selection(list(range(n_features)), [])


# --- CSV layout: header, where the data starts, and record boundaries ----------------------


@dataclass(frozen=True)
class CsvLayout:
    """What the first bytes of a CSV file tell: its column names (positions "0", "1"... for a
    file without a header), where the first data row starts, and the average row length (to
    cut blocks of about `chunk_rows` rows)."""

    path: Path
    names: list[str]
    has_header: bool
    data_start: int
    size: int
    row_bytes: float

    @property
    def first_line(self) -> int:
        """The 1-based line of the first data row (the header is line 1)."""
        return 1 + self.has_header


def _not_text(path: Path, reason: object) -> DataError:
    return DataError(f"{path}: not a UTF-8 text CSV file ({reason})")


def csv_layout(path: Path) -> CsvLayout:
    """Read the first record of a CSV (blank lines before it skipped, a byte-order mark dropped)
    and tell whether it is a header: a first row of numbers is data, as for `bnserve train`."""
    with path.open("rb") as f:
        head = f.read(_SNIFF_BYTES)
        size = os.fstat(f.fileno()).st_size
        if b"\0" in head:
            raise _not_text(path, "it contains NUL bytes")
        try:  # the sniffed bytes may end inside a character: decoded as a prefix
            codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) >= size)
        except UnicodeDecodeError as exc:
            line = head.count(b"\n", 0, exc.start) + 1
            raise _not_text(path, f"line {line}: {exc.reason}") from None
        start = len(codecs.BOM_UTF8) if head.startswith(codecs.BOM_UTF8) else 0
        while True:  # skip blank lines: the csv module's reader gives them as empty rows
            complete = len(head) >= size
            if start >= len(head) and complete:
                raise DataError(f"{path}: empty CSV file")
            end = _record_end(head, start, complete)
            if end is None:  # the first record is longer than what was read: read more
                more = f.read(_SNIFF_BYTES)
                head += more
                size = size if more else len(head)
                continue
            if head[start:end].strip(b"\r\n"):
                break
            start = end
    try:
        first = next(csv.reader(io.StringIO(head[start:end].decode("utf-8"))), [])
    except (UnicodeDecodeError, csv.Error) as exc:
        raise _not_text(path, exc) from None
    has_header = not _all_numbers(first)
    names = [h.strip() for h in first] if has_header else [str(i) for i in range(len(first))]
    data_start = end if has_header else start
    rows = head.count(b"\n", data_start)
    row_bytes = (len(head) - data_start) / rows if rows else max(len(head) - data_start, 1)
    return CsvLayout(path, names, has_header, data_start, size, row_bytes)


def _all_numbers(row: list[str]) -> bool:
    try:
        [float(c) for c in row]
    except ValueError:
        return False
    return True


def _record_end(buf: bytes, start: int = 0, complete: bool = False) -> int | None:
    """The offset just after the first record of `buf[start:]`: its first newline outside
    quotes (an even number of quote characters before it; escaped quotes come in pairs). At the
    end of the file (`complete`) the last record may lack its newline. None: no complete record."""
    pos = start
    while True:
        newline = buf.find(b"\n", pos)
        if newline < 0:
            return len(buf) if complete and len(buf) > start else None
        if buf.count(b'"', start, newline) % 2 == 0:
            return newline + 1
        pos = newline + 1


def _last_record_end(buf: bytes) -> int:
    """The offset just after the last complete record of `buf` (0 if there is none)."""
    cut = buf.rfind(b"\n")
    if b'"' not in buf:
        return cut + 1
    while cut >= 0 and buf.count(b'"', 0, cut) % 2:
        cut = buf.rfind(b"\n", 0, cut)
    return cut + 1


def line_boundary(path: Path, offset: int, data_start: int) -> int:
    """The start of the first line at or after `offset` (a line starting exactly there counts),
    for cutting a file into byte ranges that workers read independently. Quoted newlines are
    not looked for here: a piece boundary inside a quoted value would split it."""
    if offset <= data_start:
        return data_start
    with path.open("rb") as f:
        f.seek(offset - 1)
        pos = offset - 1
        while block := f.read(_SNIFF_BYTES):
            newline = block.find(b"\n")
            if newline >= 0:
                return pos + newline + 1
            pos += len(block)
    return pos


def count_lines(path: Path, start: int, end: int) -> int:
    """The non-blank lines in bytes [start, end) of a file: the rows before a piece that starts
    mid-file, counted only when an error message needs its line number (C-speed counting, no
    parsing)."""
    lines = 0
    with path.open("rb") as f:
        f.seek(start)
        pos, previous = start, 10  # as if a newline came just before `start`
        while pos < end and (block := f.read(min(1 << 24, end - pos))):
            data = np.frombuffer(block, dtype=np.uint8)
            newlines = np.flatnonzero(data == 10)
            if len(newlines):
                starts = np.concatenate([[-1], newlines[:-1]]) + 1
                lengths = newlines - starts
                blank = (lengths == 0) | ((lengths == 1) & (data[starts] == 13))
                if previous != 10 and len(newlines):  # the first line began in an earlier block
                    blank[0] = False
                lines += int((~blank).sum())
            pos += len(block)
            previous = int(data[-1])
        if previous != 10 and pos > start:
            lines += 1  # a last line without its newline
    return lines


# --- CSV chunks ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CsvPiece:
    """Bytes [start, end) of a CSV file, both at line starts, and the 0-based index of its first
    data row (None when not known: counted on demand for an error message)."""

    start: int
    end: int
    first_row: int | None


class Locator:
    """Names row i of a chunk in messages: `line N` of a CSV (the header is line 1), `row N`
    (1-based) of a Parquet file. `index(i)` is its 0-based index among the data rows."""

    def __init__(self, first_row: int | Callable[[], int], first_line: int | None) -> None:
        self._first = first_row
        self.first_line = first_line  # the line of data row 0; None: not a CSV

    def index(self, i: int) -> int:
        if callable(self._first):
            self._first = self._first()
        return self._first + i

    def __call__(self, i: int) -> str:
        if self.first_line is None:
            return f"row {self.index(i) + 1}"
        return f"line {self.index(i) + self.first_line}"

    def shifted(self, rows: int) -> Locator:
        """The locator of a chunk that starts `rows` rows later."""
        return Locator(lambda: self.index(rows), self.first_line)


def csv_chunks(
    layout: CsvLayout,
    info: ModelInfo,
    selection: Selection,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    threads: int = 1,
    piece: CsvPiece | None = None,
) -> Iterator[Features]:
    """The model's features from a CSV file (or from one piece of it), about `chunk_rows` rows
    at a time."""
    piece = piece or CsvPiece(layout.data_start, layout.size, 0)
    parser = _BlockParser(layout, info, selection, threads)
    first_row = piece.first_row
    if first_row is None:  # a piece that starts mid-file: its rows before, only if needed

        def first_row() -> int:
            return count_lines(layout.path, layout.data_start, piece.start)

    where = Locator(first_row, layout.first_line)
    block_bytes = min(max(int(chunk_rows * layout.row_bytes), 1), MAX_CSV_CHUNK_BYTES)
    for block in _blocks(layout.path, piece.start, piece.end, block_bytes):
        features, n = parser.parse(block, where)
        where = where.shifted(n)
        if n:
            yield features


def _blocks(path: Path, start: int, end: int, block_bytes: int) -> Iterator[bytes]:
    """Bytes [start, end) of a file in blocks of about `block_bytes`, each ending at a record
    boundary (a record longer than a block makes its block longer)."""
    with path.open("rb") as f:
        f.seek(start)
        pos, carry = start, b""
        while pos < end:
            data = f.read(min(block_bytes, end - pos))
            if not data:
                break
            pos += len(data)
            buf = carry + data if carry else data
            cut = len(buf) if pos >= end else _last_record_end(buf)
            if cut == 0:
                carry = buf
                continue
            yield buf[:cut] if cut < len(buf) else buf
            carry = buf[cut:]
        if carry:
            yield carry


class _BlockParser:
    """Parses blocks of CSV records into features: pyarrow first, Python's csv module where
    pyarrow fails."""

    def __init__(
        self, layout: CsvLayout, info: ModelInfo, selection: Selection, threads: int
    ) -> None:
        self.layout, self.info, self.selection = layout, info, selection
        self.threads = threads
        self.dtype = feature_dtype(info)
        self.all_names = [f"c{i}" for i in range(len(layout.names))]
        wanted = [self.all_names[p] for p in selection.positions]
        arrow_type = pa.string() if info.columns is not None else pa.from_numpy_dtype(self.dtype)
        self.convert = pacsv.ConvertOptions(
            include_columns=wanted,
            column_types=dict.fromkeys(wanted, arrow_type),
            null_values=[],  # no cell is null: an empty number cell is an error, text stays ""
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        )

    def parse(self, block: bytes, where: Locator) -> tuple[Features, int]:
        try:
            table = self._arrow(block)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return self._python(block, where)
        columns = [table.column(i) for i in range(table.num_columns)]
        if self.info.columns is None:
            x = stack_columns(columns, table.num_rows, self.dtype)
            check_finite(x, self.layout.path, where, self._column_names())
            return x, table.num_rows
        feeds = {}
        for column, values in zip(self.info.columns, columns, strict=True):
            feed = text_feed(column, values)
            if feed is None:  # a cell the vectorized rules do not accept: find it in Python
                return self._python(block, where)
            feeds[column.name] = feed
        return feeds, table.num_rows

    def _arrow(self, block: bytes) -> pa.Table:
        read = pacsv.ReadOptions(
            column_names=self.all_names,
            use_threads=self.threads > 1,
            block_size=_PARSE_BLOCK_BYTES,
        )
        # newlines inside quoted values need the slower, quote-aware splitting
        parse = pacsv.ParseOptions(newlines_in_values=b'"' in block)
        return pacsv.read_csv(pa.py_buffer(block), read, parse, self.convert)

    def _column_names(self) -> list[str]:
        return [self.layout.names[p] for p in self.selection.positions]

    def _python(self, block: bytes, where: Locator) -> tuple[Features, int]:
        """The csv-module reader on one block: `float` per cell (or the raw columns' text
        rules), errors naming the line and the column."""
        path = self.layout.path
        try:
            rows = [row for row in csv.reader(io.StringIO(block.decode("utf-8"))) if row]
        except UnicodeDecodeError as exc:
            before = block[: block.rfind(b"\n", 0, exc.start) + 1].decode("utf-8")
            bad = sum(1 for row in csv.reader(io.StringIO(before)) if row)
            raise _not_text(path, f"{where(bad)}: {exc.reason}") from None
        except csv.Error as exc:
            raise _not_text(path, exc) from None
        positions = self.selection.positions
        if self.info.columns is not None:
            return self._python_raw(rows, where), len(rows)
        names = self._column_names()
        x = np.empty((len(rows), len(positions)), dtype=self.dtype)
        with np.errstate(over="ignore"):  # a number beyond float32: inf, refused below
            self._floats(rows, x, where, names)
        check_finite(x, path, where, names)
        return x, len(rows)

    def _floats(
        self, rows: list[list[str]], x: np.ndarray, where: Locator, names: list[str]
    ) -> None:
        path, positions = self.layout.path, self.selection.positions
        for i, row in enumerate(rows):
            for j, column in enumerate(positions):
                try:
                    x[i, j] = float(row[column])
                except (ValueError, IndexError):
                    cell_text = row[column] if column < len(row) else "(missing)"
                    raise DataError(
                        f"{path}: {where(i)}, column {names[j]!r}: {cell_text!r} is not a number"
                    ) from None

    def _python_raw(self, rows: list[list[str]], where: Locator) -> Features:
        assert self.info.columns is not None
        feeds, errors = {}, []
        for column, j in zip(self.info.columns, self.selection.positions, strict=True):
            values = []
            for i, row in enumerate(rows):
                try:
                    values.append(
                        text_cell(
                            column,
                            row[j] if j < len(row) else "",
                            f"{where(i)}, column {column.name!r}",
                        )
                    )
                except BnserveError as exc:
                    errors.append(str(exc))
                    break
            feeds[column.name] = np.array(values, dtype=column.dtype).reshape(-1, 1)
        if errors:
            raise DataError(f"{self.layout.path}: " + "; ".join(errors))
        return feeds


def stack_columns(columns: Sequence[pa.ChunkedArray], n: int, dtype: np.dtype) -> np.ndarray:
    """`[n, F]` row-major from F float columns (chunk by chunk: no concatenation)."""
    x = np.empty((n, len(columns)), dtype=dtype)
    for j, column in enumerate(columns):
        row = 0
        for chunk in column.chunks:
            x[row : row + len(chunk), j] = chunk.to_numpy(zero_copy_only=False)
            row += len(chunk)
    return x


def check_finite(x: np.ndarray, path: str | Path, where: Locator, names: Sequence[str]) -> None:
    """Refuse NaN and infinite features, naming the first such cell."""
    if np.isfinite(x).all():
        return
    i, j = (int(v) for v in np.argwhere(~np.isfinite(x))[0])
    raise DataError(
        f"{path}: {where(i)}, column {names[j]!r} is {float(x[i, j])}: row {where.index(i)} has "
        "NaN or infinite values (data rows counted from 0)"
    )


# --- raw columns, vectorized ---------------------------------------------------------------


def text_feed(column: RawColumn, values: pa.ChunkedArray | pa.Array) -> np.ndarray | None:
    """One raw column's `[n, 1]` feed from text cells with `text_cell`'s rules, vectorized:
    stripped, the training's missing texts missing, numbers parsed, booleans read. None when a
    cell breaks the rules (the caller then finds it with `text_cell`, which names it)."""
    text = pc.utf8_trim_whitespace(values)
    missing = pc.fill_null(pc.is_in(text, value_set=pa.array(sorted(column.missing_texts))), True)
    if column.kind == CATEGORICAL:
        feed = pc.if_else(missing, MISSING_TEXT, text)
        return np.asarray(feed.to_numpy(zero_copy_only=False), dtype=object).reshape(-1, 1)
    missing_np = np.asarray(missing.to_numpy(zero_copy_only=False), dtype=bool)
    if column.kind == BOOLEAN:
        lower = pc.utf8_lower(text)
        true = np.asarray(pc.is_in(lower, value_set=pa.array(sorted(TRUE_TEXTS))), dtype=bool)
        false = np.asarray(pc.is_in(lower, value_set=pa.array(sorted(FALSE_TEXTS))), dtype=bool)
        if not (true | false | missing_np).all():
            return None
        out = np.where(true, 1.0, np.where(false, 0.0, np.nan))
        return out.astype(np.float32).reshape(-1, 1)
    try:
        numbers = pc.cast(pc.if_else(missing, None, text), pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    out = np.asarray(numbers.to_numpy(zero_copy_only=False), dtype=np.float64)
    present = out[~missing_np]
    if not (np.isfinite(present).all() and (np.abs(present) <= _FLOAT32_MAX).all()):
        return None
    return np.where(missing_np, np.float32(np.nan), out.astype(np.float32)).reshape(-1, 1)


# --- Parquet -------------------------------------------------------------------------------


def parquet_file(path: Path) -> Any:
    """Open a Parquet file (pyarrow.parquet.ParquetFile), or say why it cannot be read."""
    import pyarrow.parquet as pq  # only for Parquet data

    try:
        # read page by page through a small buffer per column: pre-buffering a row group's
        # column chunks (pyarrow's default) costs memory in proportion to the row group
        return pq.ParquetFile(path, pre_buffer=False, buffer_size=_PARQUET_BUFFER_BYTES)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None


def parquet_chunks(
    path: Path,
    info: ModelInfo,
    selection: Selection,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    threads: int = 1,
    row_groups: Sequence[int] | None = None,
) -> Iterator[Features]:
    """The model's features from a Parquet file (or some of its row groups), `chunk_rows` rows
    at a time. Numbers, booleans and text are read; a null feature is an error for a plain
    model and a missing value for a raw column. Errors name the 1-based data row."""
    reader = parquet_file(path)
    names = reader.schema_arrow.names
    wanted = [names[p] for p in selection.positions]
    first = 0
    if row_groups is not None and row_groups:
        meta = reader.metadata
        first = sum(meta.row_group(g).num_rows for g in range(min(row_groups)))
    dtype = feature_dtype(info)
    schema = reader.schema_arrow
    row_bytes = sum(_value_bytes(schema.field(name).type) for name in wanted)
    batch_rows = max(1, min(chunk_rows, MAX_PARQUET_CHUNK_BYTES // max(row_bytes, 1)))
    try:
        batches = reader.iter_batches(
            batch_size=batch_rows, columns=wanted, use_threads=threads > 1, row_groups=row_groups
        )
        for batch in batches:
            where = Locator(first, None)
            if info.columns is None:
                x = np.empty((batch.num_rows, len(wanted)), dtype=dtype)
                for j, name in enumerate(wanted):
                    x[:, j] = _float_column(batch.column(j), path, name, where)
                check_finite(x, path, where, wanted)
                yield x
            else:
                yield {
                    c.name: _raw_column(c, batch.column(j), path, where)
                    for j, c in enumerate(info.columns)
                }
            first += batch.num_rows
    except pa.ArrowException as exc:
        raise DataError(f"{path}: cannot read the Parquet data ({exc})") from None


def _float_column(values: pa.Array, path: Path, name: str, where: Locator) -> np.ndarray:
    kind = values.type
    if values.null_count:
        i = int(np.flatnonzero(np.asarray(values.is_null()))[0])
        raise DataError(f"{path}: {where(i)}, column {name!r}: missing value (null)")
    if pa.types.is_float32(kind):
        return values.to_numpy()
    if _is_number(kind) or pa.types.is_decimal(kind):
        return _float64(values)
    if not _is_text(kind):
        raise DataError(f"{path}: column {name!r} holds {kind}, not numbers")
    try:
        return _float64(values)
    except pa.ArrowInvalid:
        pass
    out = np.empty(len(values), dtype=np.float64)
    for i, text in enumerate(values.to_pylist()):
        try:
            out[i] = float(text)
        except ValueError:
            raise DataError(
                f"{path}: {where(i)}, column {name!r}: {text!r} is not a number"
            ) from None
    return out


def _value_bytes(kind: pa.DataType) -> int:
    """About how many bytes one value of a column takes in memory (text: a guess)."""
    try:
        return max(kind.bit_width // 8, 1)
    except ValueError:  # not a fixed-width type
        return 16


def _is_number(kind: pa.DataType) -> bool:
    return pa.types.is_floating(kind) or pa.types.is_integer(kind) or pa.types.is_boolean(kind)


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _float64(values: pa.Array) -> np.ndarray:
    """Numbers (or text pyarrow reads as numbers) as float64, null as NaN."""
    return np.asarray(
        pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64
    )


def _raw_column(column: RawColumn, values: pa.Array, path: Path, where: Locator) -> np.ndarray:
    """A raw column from Parquet: text by `text_cell`'s rules, numbers and booleans as they are,
    null as missing."""
    kind = values.type
    if _is_text(kind):
        feed = text_feed(column, values)
        if feed is not None:
            return feed
    elif column.kind != CATEGORICAL and _is_number(kind):
        out = _float64(values)  # null and NaN: missing
        present = out[~np.isnan(out)]
        if column.kind == BOOLEAN:
            ok = np.isin(present, (0.0, 1.0)).all()
        else:
            ok = np.isfinite(present).all() and (np.abs(present) <= _FLOAT32_MAX).all()
        if ok:
            return out.astype(np.float32).reshape(-1, 1)
    cells = []  # anything else, or a cell the vectorized rules refuse: one value at a time
    for i, value in enumerate(values.to_pylist()):
        here = f"{where(i)}, column {column.name!r}"
        try:
            cells.append(
                text_cell(column, value, here)
                if isinstance(value, str)
                else cell(column, value, here)
            )
        except BnserveError as exc:
            raise DataError(f"{path}: {exc}") from None
    return np.array(cells, dtype=column.dtype).reshape(-1, 1)


# --- writing predictions -------------------------------------------------------------------


def prediction_columns(labels: Sequence[object]) -> list[str]:
    """The output's columns: label, class_index, then one probability per class."""
    return ["label", "class_index", *(f"p_{label}" for label in labels)]


def prediction_schema(labels: Sequence[object]) -> pa.Schema:
    names = prediction_columns(labels)
    return pa.schema(
        [(names[0], pa.string()), (names[1], pa.int64())]
        + [(name, pa.float32()) for name in names[2:]]
    )


def prediction_table(labels: Sequence[object], probabilities: np.ndarray) -> pa.Table:
    """One chunk of predictions: the best class's label and index, and every probability."""
    best = probabilities.argmax(axis=1).astype(np.int64)
    label_text = pa.array([str(label) for label in labels], type=pa.string())
    columns = [label_text.take(pa.array(best)), pa.array(best)]
    columns += [pa.array(probabilities[:, j], type=pa.float32()) for j in range(len(labels))]
    return pa.Table.from_arrays(columns, schema=prediction_schema(labels))


class PredictionWriter:
    """Writes predictions chunk by chunk to an open binary stream: CSV (a header line, then
    pyarrow's writer; numbers in their shortest round-trip form) or Parquet."""

    def __init__(self, stream: BinaryIO, labels: Sequence[object], parquet: bool) -> None:
        self.stream, self.labels, self.parquet = stream, labels, parquet
        self.rows = 0
        self._parquet_writer: Any = None
        self._pending: list[pa.Table] = []  # Parquet: chunks gathered into one row group
        if parquet:
            import pyarrow.parquet as pq

            # dictionary-encode the label only: probabilities rarely repeat, and trying costs
            # time and memory for every column
            self._parquet_writer = pq.ParquetWriter(
                stream, prediction_schema(labels), use_dictionary=["label"]
            )
        else:
            # the csv module's dialect: CRLF line ends, quotes only where a value needs them
            # (pyarrow's "needed" style quotes every string: used only when a label needs it)
            header = io.StringIO()
            csv.writer(header).writerow(prediction_columns(labels))
            stream.write(header.getvalue().encode("utf-8"))
            plain = all(not any(ch in str(label) for ch in ',"\r\n') for label in labels)
            self._options = pacsv.WriteOptions(
                include_header=False, quoting_style="none" if plain else "needed", eol="\r\n"
            )

    def write(self, probabilities: np.ndarray) -> None:
        self.write_table(prediction_table(self.labels, probabilities))

    def write_table(self, table: pa.Table) -> None:
        """Write predictions already in `prediction_table`'s form."""
        self.rows += table.num_rows
        if self._parquet_writer is not None:
            self._pending.append(table)
            if sum(t.num_rows for t in self._pending) >= OUTPUT_ROW_GROUP_ROWS:
                self._flush_row_group()
            return
        sink = pa.BufferOutputStream()
        pacsv.write_csv(table, sink, self._options)
        self.stream.write(memoryview(sink.getvalue()))

    def _flush_row_group(self) -> None:
        if self._pending:
            self._parquet_writer.write_table(pa.concat_tables(self._pending))
            self._pending = []

    def close(self) -> None:
        """Finish the file (Parquet: the last row group and the footer)."""
        if self._parquet_writer is not None:
            self._flush_row_group()
            self._parquet_writer.close()
            self._parquet_writer = None
        self.stream.flush()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        if kind is None:
            self.close()
        elif self._parquet_writer is not None:  # a failed file is thrown away: no footer
            with contextlib.suppress(Exception):
                self._parquet_writer.close()
            self._parquet_writer = None
