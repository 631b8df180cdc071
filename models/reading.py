"""Reading a training table at library speed: a CSV cut at line breaks into pieces that threads
parse with pyarrow's streaming reader (`read_csv`), Parquet with pyarrow.parquet batch by batch,
both into arrays allocated once.

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
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from bnserve.errors import DataError, comment_line_hint

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

    def nonfinite_counts(self) -> dict[str, int]:
        """Per numeric column, its NaN and infinite cells: one pass over the block in runs of
        rows, where scanning each column (a strided view of the block) would read all of the
        block once per column."""
        if self.numeric_block is None:
            return {}
        counts = np.zeros(len(self.numeric_names), dtype=np.int64)
        for start in range(0, len(self.numeric_block), 1 << 16):
            counts += (~np.isfinite(self.numeric_block[start : start + (1 << 16)])).sum(axis=0)
        return dict(zip(self.numeric_names, counts.tolist(), strict=True))


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
#: Measured on 549 MB of floats: 1 MB blocks parse a third faster than 4 MB (they stay in cache).
BLOCK_BYTES = 1 << 20
#: Bytes of CSV each thread takes at a time (cut at a line break): a few per thread keep the
#: threads evenly busy, and one piece is all a thread holds besides the final arrays.
PIECE_BYTES = 8 << 20


@dataclass(frozen=True)
class _Piece:
    """A byte range of the file's body holding whole lines, and where its rows go in the arrays."""

    start: int
    end: int  # -1: to the end of the file, read as a stream (_whole_body)
    lines: int  # at least its number of rows: the arrays keep this many places for them
    row: int = 0
    quoted: bool = True  # it holds a quote, so a quoted cell in it may hold a line break


def read_csv(
    path: Path, missing_values: tuple[str, ...], text_columns: tuple[str, ...], dtype: np.dtype
) -> Table:
    """Every column of a CSV; `text_columns` (the label) are always read as text.

    The body is cut at line breaks into pieces that threads parse in parallel (pyarrow's own
    multithreaded reader holds the whole table; its streaming one runs on one core), each
    straight into its place in arrays allocated once (bounded by a count of line breaks), so the
    peak memory is the final arrays plus one piece per thread. Column types are inferred from
    the first block; a column that turns out not to be numeric further down is read again as
    text (a categorical column, models/tabular.py)."""
    header = read_header(path)
    text = set(text_columns)
    pieces = _pieces(path)
    while True:
        try:
            return _parse_csv(path, header, pieces, missing_values, text, dtype)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            failed = _failed_column(exc, header)
            if failed is None and len(pieces) > 1:  # a cut may have split a quoted cell
                pieces = [_whole_body(path, sum(p.lines for p in pieces))]
                continue
            if failed is None or failed in text:
                raise _explain(path, header, exc) from None
            text.add(failed)
        except UnicodeDecodeError as exc:
            raise _explain(path, header, exc) from None


def _pieces(path: Path) -> list[_Piece]:
    """The body (after the header) cut at line breaks into pieces of about PIECE_BYTES, with
    the arrays' row where each starts. A quoted cell may hold a line break, so a cut is kept
    only where an even number of quote characters precedes it (outside any quoted cell, as
    doubled quotes inside one come in pairs); read_csv reads the body as one piece when a
    parallel parse fails, so a stray quote in an unquoted cell costs speed, never a wrong row."""
    body = _body_start(path)
    size = path.stat().st_size
    if body >= size:
        raise DataError(f"{path}: only a header row, no data")
    cuts = {_line_start(path, b) for b in range(body + PIECE_BYTES, size, PIECE_BYTES)}
    bounds = list(itertools.pairwise(sorted({body, size, *cuts})))
    with ThreadPoolExecutor(pa.cpu_count()) as threads:
        counts = list(threads.map(lambda ab: _count_lines(path, *ab), bounds))
    pieces: list[_Piece] = []
    start, lines, quotes, quoted = body, 0, 0, False
    for (_, end), (piece_lines, piece_quotes) in zip(bounds, counts, strict=True):
        lines += piece_lines
        quotes += piece_quotes
        quoted = quoted or piece_quotes > 0
        if quotes % 2 == 0 or end == size:
            pieces.append(_Piece(start, end, lines, sum(p.lines for p in pieces), quoted))
            start, lines, quoted = end, 0, False
    return pieces


def _whole_body(path: Path, lines: int) -> _Piece:
    """The body as one piece read as a stream (not held in memory)."""
    return _Piece(_body_start(path), -1, lines)


_LINE_END = re.compile(rb"\r\n|\r|\n")  # as pyarrow and the csv module end lines


def _body_start(path: Path) -> int:
    """The byte just past the header line (blank lines before it skipped, see header_line)."""
    lines = header_line(path) + 1
    data = b""
    with open(path, "rb") as f:
        while more := f.read(1 << 16):
            data += more
            ends = [m.end() for m in itertools.islice(_LINE_END.finditer(data), lines)]
            if len(ends) == lines and ends[-1] < len(data):  # (a \r last may precede a \n)
                return ends[-1]
    ends = [m.end() for m in itertools.islice(_LINE_END.finditer(data), lines)]
    return ends[-1] if len(ends) == lines else len(data)


def _line_start(path: Path, position: int) -> int:
    """The first line start after `position` (just past a line break), or the file's size."""
    with open(path, "rb") as f:
        f.seek(position)
        f.readline()
        return f.tell()


def _count_lines(path: Path, start: int, end: int) -> tuple[int, int]:
    """How many rows [start, end) can hold at most, and how many quote characters it holds.
    pyarrow ends a row at \\n, \\r\\n or a lone \\r; a last line may lack its break."""
    with open(path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    data = np.frombuffer(raw, dtype=np.uint8)
    # numpy's comparisons run without the GIL (bytes.count holds it): the threads count at once
    lines = np.count_nonzero(data == ord("\n")) + 1
    if b"\r" in raw:  # a fast search; most files have no \r (or \r\n only: counted below)
        carriage = data == ord("\r")
        lines += np.count_nonzero(carriage) - np.count_nonzero(carriage[:-1] & (data[1:] == 10))
    return int(lines), int(np.count_nonzero(data == ord('"')))


def _parse_csv(
    path: Path,
    header: list[str],
    pieces: list[_Piece],
    missing_values: tuple[str, ...],
    text: set[str],
    dtype: np.dtype,
) -> Table:
    convert = pacsv.ConvertOptions(
        null_values=list(missing_values),
        strings_can_be_null=True,
        true_values=[],  # "1"/"0" stay numbers; true/false stay text (models/tabular.py types them)
        false_values=[],
        column_types={name: pa.string() for name in text},
    )
    with _open_piece(path, pieces[0], header, convert) as reader:
        schema = reader.schema
    # every piece parses with the first block's types, so they agree; numbers as float64 (an
    # integer column may hold a decimal further down), anything else (dates too) as its text
    numeric = [i for i, f in enumerate(schema) if _is_number(f.type) or pa.types.is_null(f.type)]
    convert.column_types = {
        name: pa.float64() if i in numeric else pa.string() for i, name in enumerate(header)
    }
    capacity = sum(p.lines for p in pieces)
    _check_fits(path, capacity, len(numeric), np.dtype(dtype))
    block = np.empty((capacity, len(numeric)), dtype=dtype)
    failed = threading.Event()

    def parse(piece: _Piece) -> tuple[int, dict[int, list[str]]]:
        try:
            return _parse_piece(
                path, piece, header, convert, numeric, block, missing_values, failed
            )
        except BaseException:
            failed.set()  # the other threads stop at their next block
            raise

    with ThreadPoolExecutor(min(pa.cpu_count(), len(pieces))) as threads:
        parsed = list(threads.map(parse, pieces))
    rows = 0
    texts: dict[int, list[str]] = {i: [] for i in range(len(header)) if i not in numeric}
    for piece, (n, piece_texts) in zip(pieces, parsed, strict=True):
        if piece.row != rows:  # an earlier piece had fewer rows than line breaks (blank lines)
            block[rows : rows + n] = block[piece.row : piece.row + n]
        for i, out in texts.items():
            out.extend(piece_texts[i])
        rows += n
    if rows == 0:
        raise DataError(f"{path}: only a header row, no data")
    columns: list[Column] = [[] for _ in header]
    for k, i in enumerate(numeric):
        columns[i] = block[:rows, k]
    for i, out in texts.items():
        columns[i] = out
    return Table(header, columns, rows, block[:rows], tuple(header[i] for i in numeric))


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), if it says."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _check_fits(path: Path, rows: int, columns: int, dtype: np.dtype) -> None:
    """Refuse, with the way out, a table whose numeric arrays alone exceed the free memory: the
    kernel would kill the process without a word (the rows are a bound: its line breaks)."""
    need = rows * columns * dtype.itemsize
    available = available_memory()
    if available is None or need <= available:
        return
    gb = 1 << 30
    smaller = " (or --dtype float32, half of it)" if dtype.itemsize == 8 else ""
    raise DataError(
        f"{path}: up to {rows:,} rows x {columns} numeric columns need {need / gb:.1f} GiB as "
        f"{dtype.name}, and {available / gb:.1f} GiB of memory is available; `bnserve train "
        f"--stream` trains on it out of core{smaller}"
    )


def _open_piece(
    path: Path, piece: _Piece, header: list[str], convert: pacsv.ConvertOptions
) -> pacsv.CSVStreamingReader:
    source = pa.OSFile(str(path))
    source.seek(piece.start)
    if piece.end >= 0:  # the piece in memory: the reader stops at its end
        with source:
            source = pa.BufferReader(source.read_buffer(piece.end - piece.start))
    read = pacsv.ReadOptions(column_names=header, block_size=BLOCK_BYTES, use_threads=False)
    # pyarrow cuts its blocks at any line break unless told that values may hold one
    parse = pacsv.ParseOptions(newlines_in_values=piece.quoted)
    return pacsv.open_csv(source, read_options=read, parse_options=parse, convert_options=convert)


def _parse_piece(
    path: Path,
    piece: _Piece,
    header: list[str],
    convert: pacsv.ConvertOptions,
    numeric: list[int],
    block: np.ndarray,
    missing_values: tuple[str, ...],
    failed: threading.Event,
) -> tuple[int, dict[int, list[str]]]:
    """Parse one piece into its rows of `block`; its row count and its text columns."""
    chunks: dict[int, list[pa.Array]] = {i: [] for i in range(len(header)) if i not in numeric}
    rows = piece.row
    with _open_piece(path, piece, header, convert) as reader:
        for batch in reader:
            if failed.is_set():
                break
            n = batch.num_rows
            if rows + n > piece.row + piece.lines:
                raise RuntimeError(f"{path}: more rows than line breaks at byte {piece.start}")
            if numeric:
                block[rows : rows + n] = batch.select(numeric).to_tensor(null_to_nan=True)
            for i, out in chunks.items():
                out.append(batch.column(i))
            rows += n
    missing_text = missing_values[0] if missing_values else ""
    texts = {i: _texts(pa.chunked_array(c, pa.string()), missing_text) for i, c in chunks.items()}
    return rows - piece.row, texts


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
    _check_fits(path, rows, len(numeric), np.dtype(dtype))
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
    texts.append(missing_text)
    indices = encoded.indices.fill_null(len(texts) - 1).cast(pa.int64())
    codes = np.frombuffer(indices.buffers()[1], np.int64, count=indices.offset + len(indices))
    return np.array(texts, dtype=object)[codes[indices.offset :]].tolist()


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
                        f"(ragged row){comment_line_hint(header=header, row=row)}"
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
