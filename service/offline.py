"""Offline batch scoring (`bnserve predict`): read CSV or npz, score, write a CSV atomically.

Same model loading and output handling as the server (`ModelRuntime.probabilities`), so a file
scored offline gets the numbers the HTTP API would give.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np

from bnserve.atomic import atomic_path
from bnserve.errors import BnserveError, DataError, UsageError
from bnserve.service.columns import RawColumn, text_cell
from bnserve.service.runtime import ModelRuntime


def read_features(path: Path, runtime: ModelRuntime) -> np.ndarray | dict[str, np.ndarray]:
    """`[n, F]` float array from a CSV (by feature name when the model has names) or an npz;
    for a raw-column model, one array per column of a CSV (columns by name, cells as text)."""
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if runtime.info.columns is not None:
        if path.suffix not in (".csv", ".txt"):
            raise DataError(f"{path}: this model reads raw table columns: give a .csv file")
        return _read_raw_csv(path, runtime.info.columns)
    if path.suffix == ".npz":
        return _read_npz(path, runtime.info.n_features)
    if path.suffix in (".csv", ".txt"):
        return _read_csv(path, runtime)
    raise DataError(f"{path}: expected a .csv or .npz file")


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


def _read_csv(path: Path, runtime: ModelRuntime) -> np.ndarray:
    with path.open(newline="") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows:
        raise DataError(f"{path}: empty CSV file")
    n_features = runtime.info.n_features
    names = runtime.info.feature_names
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
        if names is not None and set(names) <= set(header):
            columns = [header.index(n) for n in names]
            extra = [h for h in header if h not in set(names)]
            if extra:
                print(f"bnserve predict: ignoring columns {', '.join(extra)}", file=sys.stderr)
        elif names is not None:
            missing = [n for n in names if n not in header]
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DataError(
                f"{path}: {len(missing)} of the model's feature columns are missing: {shown}"
            )
        elif len(header) == n_features:
            columns = list(range(n_features))
        else:
            raise DataError(
                f"{path}: {len(header)} columns, the model expects {n_features} features"
            )
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


def _finite(x: np.ndarray, path: Path) -> np.ndarray:
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
    a reader never sees half a file and a failure leaves the old one."""
    if out.is_dir():
        raise UsageError(f"-o {out}: is a directory, expected a file name")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: directory {out.parent} does not exist")
    labels = runtime.labels
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "class_index", *(f"p_{label}" for label in labels)])
        best = probabilities.argmax(axis=1) if len(probabilities) else []
        for row, index in zip(probabilities, best, strict=True):
            writer.writerow([labels[index], int(index), *(str(p) for p in row)])
