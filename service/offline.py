"""Offline batch scoring (`bnserve predict`): read a CSV or Parquet file chunk by chunk (or an
npz file or a bundled data set), score each chunk, and write CSV or Parquet atomically (or CSV to
standard output).

Same model loading and output handling as the server (`ModelRuntime.probabilities`), so a file
scored offline gets the numbers the HTTP API would give. One chunk at a time is read (by pyarrow,
service/columnar.py), scored and written, so memory depends on the chunk size, not on the file's.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bnserve.atomic import atomic_path
from bnserve.errors import DataError, UsageError, require_extra
from bnserve.service.columnar import (
    DEFAULT_CHUNK_ROWS,
    CsvLayout,
    Features,
    PredictionWriter,
    Selection,
    csv_chunks,
    csv_layout,
    is_parquet,
    parquet_chunks,
    parquet_file,
    select_columns,
)
from bnserve.service.metadata import ModelInfo
from bnserve.service.runtime import ModelRuntime

#: `-o -` writes the predictions to standard output.
STDOUT = "-"


def feature_chunks(
    source: str | Path,
    info: ModelInfo,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    threads: int = 1,
    notices: bool = True,
) -> Iterator[Features]:
    """The model's features from the sources `bnserve train` reads, about `chunk_rows` rows at
    a time: a CSV or a Parquet file (by feature name when the model has names; a raw-column
    model's columns by name), an npz (`X`), or a bundled data set `sklearn:NAME` (its label is
    not a feature). Columns the model does not read are named on standard error (`notices`)."""
    if isinstance(source, str) and source.startswith("sklearn:"):
        yield from _slices(_read_bundled(source, info), chunk_rows)
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix.lower() == ".npz":
        if info.columns is not None:
            raise DataError(
                f"{path}: this model reads raw table columns: give a CSV or Parquet file"
            )
        yield from _slices(_read_npz(path, info.n_features), chunk_rows)
        return
    if is_parquet(path):
        selection = select_columns(parquet_file(path).schema_arrow.names, info, path)
        _notice(selection, notices)
        yield from parquet_chunks(path, info, selection, chunk_rows, threads)
        return
    layout = csv_layout(path)  # any other name is a CSV, as for `bnserve train`
    selection = csv_selection(layout, info)
    _notice(selection, notices)
    yield from csv_chunks(layout, info, selection, chunk_rows, threads)


def csv_selection(layout: CsvLayout, info: ModelInfo) -> Selection:
    """The model's columns of a CSV: by name under a header; every column, in order, in a file
    without one (a plain model's features only)."""
    if layout.has_header or info.columns is not None:
        return select_columns(layout.names, info, layout.path)
    if len(layout.names) != info.n_features:
        raise DataError(
            f"{layout.path}: {len(layout.names)} columns, the model expects "
            f"{info.n_features} features"
        )
    return Selection(list(range(info.n_features)), [])


def _notice(selection: Selection, enabled: bool) -> None:
    if enabled and selection.ignored:
        print(f"bnserve predict: ignoring columns {', '.join(selection.ignored)}", file=sys.stderr)


def _slices(x: np.ndarray, chunk_rows: int) -> Iterator[np.ndarray]:
    for start in range(0, len(x), chunk_rows):
        yield x[start : start + chunk_rows]


def _read_bundled(source: str, info: ModelInfo) -> np.ndarray:
    # The bundled sets are named and loaded in one place, the trainer's loader. It is imported
    # here, not at module level: the serving package imports neither bnserve.models nor
    # scikit-learn (docs/architecture.md), and only this data source needs them.
    from bnserve.models.data import BUNDLED, load_raw

    if source.split(":", 1)[1] in BUNDLED:
        require_extra("sklearn", "train", f"predict {source}")
    x, _, names = load_raw(source, None)
    if info.columns is not None:
        raise DataError(f"{source}: this model reads raw table columns: give a CSV or Parquet file")
    return _finite(x[:, select_columns(names, info, source).positions], source)


def _read_npz(path: Path, n_features: int) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "X" in data.files:
                x = data["X"]
            elif len(data.files) == 1:
                x = data[data.files[0]]
            else:
                raise DataError(
                    f"{path}: expected an array named 'X' (found {', '.join(data.files)})"
                )
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable npz file ({exc})") from None
    if x.ndim != 2 or x.shape[1] != n_features:
        raise DataError(f"{path}: X has shape {list(x.shape)}, the model expects [n, {n_features}]")
    if x.dtype.kind not in "iuf":
        raise DataError(f"{path}: X has dtype {x.dtype}, expected numbers")
    return _finite(x.astype(np.float64), path)


def _finite(x: np.ndarray, path: str | Path) -> np.ndarray:
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0][0])
        raise DataError(f"{path}: row {row} has NaN or infinite values")
    return x


def score(runtime: ModelRuntime, x: Features, batch_size: int = 4096) -> np.ndarray:
    """Class probabilities for every row, in batches to bound memory."""
    n = len(next(iter(x.values()))) if isinstance(x, dict) else len(x)
    if n == 0:
        return np.zeros((0, runtime.n_classes), dtype=np.float32)
    parts = []
    for i in range(0, n, batch_size):
        part = (
            {k: v[i : i + batch_size] for k, v in x.items()}
            if isinstance(x, dict)
            else x[i : i + batch_size]
        )
        parts.append(runtime.probabilities(part))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def check_output(out: Path) -> None:
    """Refuse an output that cannot be written before any work is done."""
    if str(out) == STDOUT:
        return
    if out.is_dir():
        raise UsageError(f"-o {out}: is a directory, expected a file name")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: directory {out.parent} does not exist")


@contextlib.contextmanager
def prediction_writer(out: Path, labels: Sequence[object]) -> Iterator[PredictionWriter]:
    """A writer of predictions into `out`: CSV, or Parquet for a `.parquet` name, written to a
    temporary file renamed into place when the block succeeds, so a reader never sees half a
    file and a failure keeps the old one. `-o -` writes CSV to standard output as it goes."""
    check_output(out)
    if str(out) == STDOUT:
        sys.stdout.flush()
        stream = getattr(sys.stdout, "buffer", None)
        if stream is None:  # a text-only stand-in for standard output
            stream = _TextSink(sys.stdout)
        with PredictionWriter(stream, labels, parquet=False) as writer:
            yield writer
        return
    with (
        atomic_path(out) as tmp,
        open(tmp, "wb") as f,
        PredictionWriter(f, labels, parquet=is_parquet(out)) as writer,
    ):
        yield writer


class _TextSink:
    """Bytes written to a text stream (UTF-8)."""

    def __init__(self, text: Any) -> None:
        self.text = text

    def write(self, data: bytes | memoryview) -> int:
        self.text.write(bytes(data).decode("utf-8"))
        return len(data)

    def flush(self) -> None:
        self.text.flush()


def predict(
    runtime: ModelRuntime,
    source: str | Path,
    out: Path,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    threads: int = 1,
    batch_size: int = 4096,
    progress: bool | None = None,
) -> int:
    """Score `source` into `out` chunk by chunk; returns the number of rows. `progress`
    (default: when standard error is a terminal) shows rows/s on standard error."""
    meter = _Progress(sys.stderr.isatty() if progress is None else progress)
    chunks = feature_chunks(source, runtime.info, chunk_rows, threads)
    with prediction_writer(out, runtime.labels) as writer:
        for x in chunks:
            writer.write(score(runtime, x, batch_size))
            meter.show(writer.rows)
    meter.done(writer.rows)
    return writer.rows


class _Progress:
    """Rows and rows/s on standard error, at most twice a second."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.start = self.last = time.perf_counter()
        self.shown = False

    def show(self, rows: int, final: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.5 and not final):
            return
        self.last = now
        rate = rows / max(now - self.start, 1e-9)
        print(f"\rbnserve predict: {rows:,} rows, {rate:,.0f} rows/s", end="", file=sys.stderr)
        self.shown = True

    def done(self, rows: int) -> None:
        if self.shown:
            self.show(rows, final=True)
            print(file=sys.stderr)
