"""Loading and validating data sets: CSV with a header, `.npz` with `X` and `y`, or `sklearn:NAME`.

Every problem raises `DataError` with the file and, where it applies, the row and column, so the CLI
can print it and exit with code 2. A CSV whose feature columns are all complete numbers is read
into `Dataset.X` directly; any other (strings, booleans, missing cells) keeps its raw columns in
`Dataset.table` with the column kinds in `Dataset.preprocessor`, fitted on the training split
only (`Dataset.encode`, models/tabular.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bnserve.errors import DataError
from bnserve.models.reading import column_text, read_csv, read_header, read_parquet
from bnserve.models.tabular import (
    ColumnOptions,
    Preprocessor,
    RawTable,
    needs_preprocessing,
    numbers,
    select_columns,
    summary,
    type_columns,
)

BUNDLED = ("digits", "iris", "wine", "breast_cancer")


@dataclass
class Dataset:
    X: np.ndarray | None  # [n, F] float64 (None for a raw table until `encode`)
    y: np.ndarray  # [n] int64 class indices into class_names
    class_names: list[str]
    feature_names: list[str]  # the network's features (encoded names for a raw table)
    source: str
    table: RawTable | None = None  # the raw feature columns, when they need preprocessing
    preprocessor: Preprocessor | None = None
    label: str | None = None  # the label column's name (CSV)
    label_defaulted: bool = False

    @property
    def n_features(self) -> int:
        assert self.X is not None, "encode() a raw table first"
        return self.X.shape[1]

    def encode(self, train_rows: np.ndarray) -> None:
        """Fit the preprocessing on `train_rows` and encode every row (raw tables only)."""
        if self.table is None or self.preprocessor is None:
            return
        self.preprocessor.fit(self.table, train_rows)
        self.X = self.preprocessor.transform(self.table)
        self.feature_names = self.preprocessor.encoded_names()


def describe_data(data: Dataset) -> str:
    """What will be trained on: rows, the label, and each raw column's kind and missing count."""
    if data.table is None or data.preprocessor is None:
        return (
            f"{data.source}: {len(data.y)} rows, {len(data.feature_names)} numeric features, "
            f"{len(data.class_names)} classes"
        )
    return (
        summary(data.preprocessor.columns, data.label or "?", data.label_defaulted, len(data.y))
        + f"\n  ({len(data.class_names)} classes)"
    )


@dataclass
class RawData:
    """What a data source holds before labels are encoded."""

    X: np.ndarray | None
    labels: list[str]
    feature_names: list[str]
    table: RawTable | None = None
    preprocessor: Preprocessor | None = None
    label: str | None = None  # the label column's name (CSV)
    label_defaulted: bool = False


def load_dataset(
    source: str,
    label: str | None = None,
    options: ColumnOptions | None = None,
    dtype: np.dtype | type = np.float64,
) -> Dataset:
    """Load `source` and check it is usable for training (finite numbers, at least two classes);
    numeric features are held as `dtype` (float32 when the model trains in float32)."""
    raw = load_source(source, label, options=options, dtype=dtype)
    class_names, y = _encode_labels(raw.labels)
    if len(class_names) < 2:
        raise DataError(f"{source}: only one class ({class_names[0]!r}); need at least two")
    return Dataset(
        raw.X,
        y,
        class_names,
        raw.feature_names,
        source,
        raw.table,
        raw.preprocessor,
        raw.label,
        raw.label_defaulted,
    )


def load_raw(
    source: str,
    label: str | None,
    require_label: bool = True,
) -> tuple[np.ndarray, list[str], list[str]]:
    """Returns `(X, labels as strings, feature names)` of an all-numeric source."""
    raw = load_source(source, label, require_label)
    if raw.X is None:
        assert raw.table is not None
        raise DataError(
            f"{source}: columns that are not complete numbers "
            f"({', '.join(repr(c.name) for c in raw.preprocessor.columns if c.kind != 'numeric' or c.missing_in_data)}); "
            "this needs a model trained on such data"
        )
    return raw.X, raw.labels, raw.feature_names


def load_source(
    source: str,
    label: str | None,
    require_label: bool = True,
    options: ColumnOptions | None = None,
    dtype: np.dtype | type = np.float64,
) -> RawData:
    """Any data source: numeric features in `X` (as `dtype`), or a raw table to preprocess."""
    if source.startswith("sklearn:"):
        return RawData(*_load_bundled(source))
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file")
    if path.is_dir():
        raise DataError(f"{source}: is a directory, expected a .csv, .parquet or .npz file")
    if path.stat().st_size == 0:
        raise DataError(f"{source}: the file is empty")
    if path.suffix.lower() == ".npz":
        X, labels, names = _load_npz(path, require_label)
        return RawData(X, canonical_labels(labels), names)
    raw = _load_table(path, label, require_label, options or ColumnOptions(), np.dtype(dtype))
    raw.labels = canonical_labels(raw.labels)
    return raw


def _load_bundled(source: str) -> tuple[np.ndarray, list[str], list[str]]:
    name = source.split(":", 1)[1]
    if name not in BUNDLED:
        raise DataError(
            f"{source}: unknown bundled data set; expected one of sklearn:"
            + ", sklearn:".join(BUNDLED)
        )
    try:
        from sklearn import datasets
    except ImportError as e:
        raise DataError(
            f"{source}: bundled data sets need scikit-learn: pip install 'bnserve[train]'"
        ) from e
    bunch = getattr(datasets, f"load_{name}")()
    X = np.asarray(bunch.data, dtype=np.float64)
    target_names = getattr(bunch, "target_names", None)
    if target_names is not None and len(target_names) == len(np.unique(bunch.target)):
        labels = [str(target_names[t]) for t in bunch.target]
    else:
        labels = [str(t) for t in bunch.target]
    feature_names = [str(f) for f in getattr(bunch, "feature_names", [])]
    if len(feature_names) != X.shape[1]:
        feature_names = [f"x{i}" for i in range(X.shape[1])]
    return X, labels, feature_names


def _load_npz(path: Path, require_label: bool) -> tuple[np.ndarray, list[str], list[str]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "X" not in npz.files:
                raise DataError(
                    f"{path}: no array 'X' in the .npz (it has: {', '.join(npz.files)})"
                )
            X = npz["X"]
            y = npz["y"] if "y" in npz.files else None
            names = [str(n) for n in npz["feature_names"]] if "feature_names" in npz.files else None
    except DataError:
        raise
    except Exception as e:  # numpy raises many kinds for a damaged zip
        raise DataError(f"{path}: cannot read as .npz ({e})") from e
    if require_label and y is None:
        raise DataError(f"{path}: no array 'y' (labels) in the .npz")
    if X.ndim != 2:
        raise DataError(f"{path}: X must be 2-D [rows, features], got shape {X.shape}")
    if X.shape[0] == 0:
        raise DataError(f"{path}: X has no rows")
    # complex would lose its imaginary part silently, dates would become nanosecond counts
    if X.dtype.kind not in "biufUS":
        raise DataError(f"{path}: X is not real numeric ({X.dtype})")
    try:
        X = X.astype(np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: X is not numeric ({X.dtype})") from e
    _check_finite(X, str(path), row_offset=0)
    labels: list[str] = []
    if y is not None:
        if y.ndim != 1 or y.shape[0] != X.shape[0]:
            raise DataError(f"{path}: y must be 1-D with {X.shape[0]} entries, got shape {y.shape}")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            row = int(np.flatnonzero(~np.isfinite(y))[0])
            raise DataError(f"{path}: y[{row}] is {y[row]}, not a class label")
        labels = [_label_text(v) for v in y.tolist()]
    names = names or [f"x{i}" for i in range(X.shape[1])]
    if len(names) != X.shape[1]:
        raise DataError(f"{path}: {len(names)} feature names for {X.shape[1]} columns")
    if len(set(names)) != len(names):
        # features are matched by name (evaluate, the service): a name must say which column
        raise DataError(f"{path}: duplicate names in feature_names")
    return X, labels, names


def _label_text(v: object) -> str:
    # 1.0 and 1 are the same class; keep integral floats as integers
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, bytes):  # a numpy 'S' array: b"cat" is the class "cat", not "b'cat'"
        return v.decode("utf-8", errors="replace")
    return str(v)


def _finite_number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def canonical_labels(labels: list[str]) -> list[str]:
    """Label texts as class names. A column whose every label is a finite number is numeric:
    "1", "1.0" and "01" are one class, named as the .npz loader names it ("1"), so a CSV and an
    .npz of the same data agree; any other column keeps its texts as they are. Decided on the
    distinct texts, so a million rows cost one dictionary lookup each."""
    distinct = set(labels)
    values = {v: _finite_number(v) for v in distinct}
    if not labels or any(v is None for v in values.values()):
        return labels
    names = {text: _label_text(value) for text, value in values.items()}
    return [names[v] for v in labels]


def _load_table(
    path: Path,
    label: str | None,
    require_label: bool,
    options: ColumnOptions,
    dtype: np.dtype,
) -> RawData:
    """A CSV or Parquet file (models/reading.py), its label column as text."""
    is_parquet = path.suffix.lower() == ".parquet"
    header = None if is_parquet else read_header(path)
    if header is not None and label is not None and label not in header:
        raise DataError(
            f"{path}: label column {label!r} not found; columns are: {', '.join(header)}"
        )
    if is_parquet:
        table = read_parquet(path, options.missing_values, dtype)
    else:
        assert header is not None
        label_name = label if label is not None else (header[-1] if require_label else None)
        text = (label_name,) if label_name is not None else ()
        table = read_csv(path, options.missing_values, text, dtype)
    header = table.names
    label_col = None
    if label is not None:
        if label not in header:
            raise DataError(
                f"{path}: label column {label!r} not found; columns are: {', '.join(header)}"
            )
        label_col = header.index(label)
    elif require_label:
        label_col = len(header) - 1
    columns = table.columns
    labels: list[str] = []
    if label_col is not None:
        labels = column_text(columns[label_col], "")
        # empty or NaN is how spreadsheets and pandas write a missing value, not a class
        # decided on the distinct texts: a million labels hold a handful of them
        absent = {
            t for t in set(labels) if not t or t.lower() == "nan" or t in options.missing_values
        }
        missing = [r + 2 for r, text in enumerate(labels) if text in absent] if absent else []
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            where = f"row {shown}" if len(missing) == 1 else f"{len(missing)} rows ({shown})"
            defaulted = " (the label by default: the last column; choose it with --label)"
            raise DataError(
                f"{path}: {where}, column {header[label_col]!r}: missing label"
                + (defaulted if label is None else "")
            )
        names, cells = select_columns(header, columns, label_col, options, str(path))
    else:
        names = [h for h in header if h not in options.drop]
        cells = [columns[header.index(h)] for h in names]
    nonfinite = table.nonfinite_counts()
    kinds = type_columns(names, cells, options, str(path), nonfinite)
    raw = RawData(None, labels, names, label=None if label_col is None else header[label_col])
    raw.label_defaulted = label is None and label_col is not None
    # a numeric column read as text (it held "inf" or another spelling pyarrow did not infer)
    cells = [
        numbers(c, options.missing_values) if isinstance(c, list) and k.kind == "numeric" else c
        for c, k in zip(cells, kinds, strict=True)
    ]
    if needs_preprocessing(kinds):
        raw.table = RawTable(names, cells, str(path))
        raw.preprocessor = Preprocessor(kinds, options.missing_values, options.min_frequency)
        return raw
    if table.numeric_block is not None and tuple(names) == table.numeric_names:
        X = table.numeric_block  # the columns as read: no copy
    else:
        X = np.empty((table.n_rows, len(cells)), dtype=dtype)
        for j, column in enumerate(cells):
            X[:, j] = column
    bad = []
    for j, column in enumerate(cells):
        if nonfinite.get(names[j]) == 0:
            continue
        infinite = np.flatnonzero(~np.isfinite(column))
        if len(infinite):
            bad.append(
                f"row {infinite[0] + 2}, column {names[j]!r}: "
                f"{column_text(column[infinite[:1]])[0]!r} is not a finite number"
            )
    if bad:
        raise DataError(f"{path}: " + "; ".join(bad))
    raw.X = X
    return raw


def _check_finite(X: np.ndarray, where: str, row_offset: int) -> None:
    bad = np.argwhere(~np.isfinite(X))
    if bad.size:
        r, c = bad[0]
        raise DataError(
            f"{where}: row {r + row_offset}, column {c}: {X[r, c]} is not a finite number"
        )


def class_order(unique: set[str]) -> list[str]:
    """Class names sorted: numerically when they all are finite numbers, else as text (a NaN key
    would make the order depend on set iteration, i.e. on the hash seed)."""
    if all(_finite_number(c) is not None for c in unique):
        return sorted(unique, key=float)
    return sorted(unique)


def _encode_labels(labels: list[str]) -> tuple[list[str], np.ndarray]:
    """Class names sorted (`class_order`) and the index of each label."""
    class_names = class_order(set(labels))
    index = {c: i for i, c in enumerate(class_names)}
    return class_names, np.array([index[v] for v in labels], dtype=np.int64)


def encode_with(classes: list[str], labels: list[str], source: str) -> np.ndarray:
    """Encode `labels` with an existing class list (a test file must not bring new classes)."""
    index = {c: i for i, c in enumerate(classes)}
    # Numeric classes also match by value: a checkpoint whose classes were kept as "1.0" reads
    # a file that says 1, and the other way round.
    for c, i in list(index.items()):
        value = _finite_number(c)
        if value is not None:
            index.setdefault(_label_text(value), i)
    labels = [
        v if v in index or (x := _finite_number(v)) is None else _label_text(x) for v in labels
    ]
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise DataError(f"{source}: labels not seen in training: {', '.join(unknown[:5])}")
    return np.array([index[v] for v in labels], dtype=np.int64)


def fingerprint(X: np.ndarray, y: np.ndarray, class_names: list[str]) -> str:
    """sha256 of the training data as the model saw it (values as float64, labels, class
    names), hashed 65536 rows at a time so that no float64 copy of X is made."""
    h = hashlib.sha256()
    for start in range(0, len(X), 1 << 16):
        h.update(np.ascontiguousarray(X[start : start + (1 << 16)], dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(y, dtype=np.int64).tobytes())
    h.update("\x1f".join(class_names).encode())
    return h.hexdigest()


def stratified_split(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Indices `(rest, held_out)` with about `fraction` of each class held out (at least one each
    where the class has two or more examples)."""
    if fraction <= 0:
        return np.arange(len(y)), np.array([], dtype=np.int64)
    held: list[np.ndarray] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = round(fraction * len(idx))
        k = min(max(k, 1), len(idx) - 1) if len(idx) >= 2 else 0
        held.append(idx[:k])
    held_idx = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(y)), held_idx)
    return rest, held_idx


def load_for_model(
    source: str,
    feature_names: list[str],
    class_names: list[str],
    label: str | None = None,
    preprocessor: Preprocessor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Features in the model's column order (CSV columns are matched by name; raw columns go
    through the model's fitted `preprocessor`) and labels encoded with the model's classes; any
    mismatch is a DataError that names the columns."""
    if preprocessor is not None:
        names = tuple(preprocessor.names)  # only the model's columns; kept ids stay kept
        options = ColumnOptions(
            features=names, keep_id=names, missing_values=preprocessor.missing_values
        )
        raw = load_source(source, label, options=options)
        if raw.table is None:  # every column complete numbers this time: still the model's
            assert raw.X is not None
            raw.table = RawTable(raw.feature_names, list(raw.X.T), source)
        X = preprocessor.transform(raw.table)
        return X, encode_with(class_names, canonical_labels(raw.labels), source)
    X, labels, names = load_raw(source, label)
    if names != feature_names:
        if sorted(names) != sorted(feature_names):
            missing = [n for n in feature_names if n not in names]
            extra = [n for n in names if n not in feature_names]
            raise DataError(
                f"{source}: columns differ from the model's features "
                f"(missing: {', '.join(missing) or 'none'}; unexpected: {', '.join(extra) or 'none'})"
            )
        X = X[:, [names.index(n) for n in feature_names]]
    return X, encode_with(class_names, labels, source)
