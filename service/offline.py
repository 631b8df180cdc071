"""Offline batch scoring (`bnserve predict`): read CSV, npz or a bundled data set, score, write a
CSV atomically (or to standard output).

Same model loading and output handling as the server (`ModelRuntime.probabilities`), so a file
scored offline gets the numbers the HTTP API would give.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from bnserve.atomic import atomic_path
from bnserve.errors import BnserveError, DataError, UsageError, require_extra
from bnserve.service.columns import RawColumn, text_cell
from bnserve.service.runtime import ModelRuntime

#: `-o -` writes the predictions to standard output.
STDOUT = "-"


def read_features(source: str | Path, runtime: ModelRuntime) -> np.ndarray | dict[str, np.ndarray]:
    """`[n, F]` float array from the sources `bnserve train` reads: a CSV (by feature name when
    the model has names), an npz (`X`), or a bundled data set `sklearn:NAME` (its label is not
    a feature); for a raw-column model, one array per column of a CSV (columns by name)."""
    if isinstance(source, str) and source.startswith("sklearn:"):
        return _read_bundled(source, runtime)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if runtime.info.columns is not None:
        if path.suffix.lower() == ".npz":
            raise DataError(f"{path}: this model reads raw table columns: give a CSV file")
        return _read_raw_csv(path, runtime.info.columns)
    if path.suffix.lower() == ".npz":
        return _read_npz(path, runtime.info.n_features)
    return _read_csv(path, runtime)  # any other name is a CSV, as for `bnserve train`


def _read_bundled(source: str, runtime: ModelRuntime) -> np.ndarray:
    # The bundled sets are named and loaded in one place, the trainer's loader. It is imported
    # here, not at module level: the serving package imports neither bnserve.models nor
    # scikit-learn (docs/architecture.md), and only this data source needs them.
    from bnserve.models.data import BUNDLED, load_raw

    if source.split(":", 1)[1] in BUNDLED:
        require_extra("sklearn", "train", f"predict {source}")
    x, _, names = load_raw(source, None)
    return _finite(x[:, _feature_columns(names, runtime, source)], source)


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


def _feature_columns(header: list[str], runtime: ModelRuntime, source: str | Path) -> list[int]:
    """The positions of the model's features among named columns: by name when the model has
    names (other columns, such as a label, are ignored), else by position."""
    n_features = runtime.info.n_features
    names = runtime.info.feature_names
    if names is not None and set(names) <= set(header):
        extra = [h for h in header if h not in set(names)]
        if extra:
            print(f"bnserve predict: ignoring columns {', '.join(extra)}", file=sys.stderr)
        return [header.index(n) for n in names]
    if names is not None:
        missing = [n for n in names if n not in header]
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{source}: {len(missing)} of the model's feature columns are missing: {shown}"
        )
    if len(header) != n_features:
        raise DataError(f"{source}: {len(header)} columns, the model expects {n_features} features")
    return list(range(n_features))


def _read_csv(path: Path, runtime: ModelRuntime) -> np.ndarray:
    try:  # utf-8-sig: a spreadsheet's byte-order mark is not part of the first column's name
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [row for row in csv.reader(f) if row]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a UTF-8 text CSV file ({exc})") from None
    if not rows:
        raise DataError(f"{path}: empty CSV file")
    n_features = runtime.info.n_features
    header_is_numbers = _all_numbers(rows[0])
    if header_is_numbers:
        columns = list(range(len(rows[0])))
        if len(columns) != n_features:
            raise DataError(
                f"{path}: {len(columns)} columns, the model expects {n_features} features"
            )
        body, column_names = rows, [str(i) for i in columns]
    else:
        header = [h.strip() for h in rows[0]]
        body = rows[1:]
        columns = _feature_columns(header, runtime, path)
        column_names = header
    x = np.empty((len(body), n_features), dtype=np.float64)
    for i, row in enumerate(body):
        for j, column in enumerate(columns):
            try:
                x[i, j] = float(row[column])
            except (ValueError, IndexError):
                cell = row[column] if column < len(row) else "(missing)"
                raise DataError(
                    f"{path}: line {i + 1 + (not header_is_numbers)}, column "
                    f"{column_names[column]!r}: {cell!r} is not a number"
                ) from None
    return _finite(x, path)


def _read_raw_csv(path: Path, columns: tuple[RawColumn, ...]) -> dict[str, np.ndarray]:
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise DataError(f"{path}: empty CSV file")
    header = [h.strip() for h in rows[0]]
    missing = [c.name for c in columns if c.name not in header]
    if missing:
        raise DataError(f"{path}: the model's columns {missing} are missing (header: {header})")
    extra = [h for h in header if h not in {c.name for c in columns}]
    if extra:
        print(f"bnserve predict: ignoring columns {', '.join(map(repr, extra))}", file=sys.stderr)
    feeds = {}
    errors = []
    for column in columns:
        j = header.index(column.name)
        values = []
        for i, row in enumerate(rows[1:]):
            where = f"line {i + 2}, column {column.name!r}"
            try:
                values.append(text_cell(column, row[j] if j < len(row) else "", where))
            except BnserveError as exc:
                errors.append(str(exc))
                break
        feeds[column.name] = np.array(values, dtype=column.dtype).reshape(-1, 1)
    if errors:
        raise DataError(f"{path}: " + "; ".join(errors))
    return feeds


def _all_numbers(row: list[str]) -> bool:
    try:
        [float(cell) for cell in row]
    except ValueError:
        return False
    return True


def _finite(x: np.ndarray, path: str | Path) -> np.ndarray:
    if not np.isfinite(x).all():
        row = int(np.argwhere(~np.isfinite(x))[0][0])
        raise DataError(f"{path}: row {row} has NaN or infinite values")
    return x


def score(
    runtime: ModelRuntime, x: np.ndarray | dict[str, np.ndarray], batch_size: int = 4096
) -> np.ndarray:
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
    return np.concatenate(parts)


def write_predictions(out: Path, runtime: ModelRuntime, probabilities: np.ndarray) -> None:
    """Write label, class index and per-class probabilities; a temp file renamed into place, so
    a reader never sees half a file and a failure leaves the old one. `-o -` writes to standard
    output instead."""
    if str(out) == STDOUT:
        _write_csv(sys.stdout, runtime.labels, probabilities)
        return
    if out.is_dir():
        raise UsageError(f"-o {out}: is a directory, expected a file name")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: directory {out.parent} does not exist")
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        _write_csv(f, runtime.labels, probabilities)


def _write_csv(f: TextIO, labels: Sequence[object], probabilities: np.ndarray) -> None:
    writer = csv.writer(f)
    writer.writerow(["label", "class_index", *(f"p_{label}" for label in labels)])
    best = probabilities.argmax(axis=1) if len(probabilities) else []
    for row, index in zip(probabilities, best, strict=True):
        writer.writerow([labels[index], int(index), *(str(p) for p in row)])
