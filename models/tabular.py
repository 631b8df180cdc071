"""Real tabular data: column types, missing values, categories and identifier-like columns.

A CSV is read as text columns (`RawTable`). Each feature column gets a kind, inferred from its
non-missing cells:

- numeric: every cell a finite number;
- boolean: every cell one of true/false, yes/no, t/f, y/n (any case), or 0/1;
- categorical: anything else (strings), and numeric columns named with `--categorical`.

Identifier-like columns (an empty or pandas-style `Unnamed: 0` header, or integers unique per
row and sorted, such as a written-out row index) are refused unless dropped (`--drop`) or kept
(`--keep-id`): with rows sorted by class, a row number alone predicts the label.

`Preprocessor.fit` learns, from the training rows only: the median of each numeric column (the
most frequent value of a boolean one) to impute missing cells with, whether a column had missing
values (then a 0/1 missing-indicator feature follows it), and each categorical column's kept
categories (at least `min_frequency` training rows); rarer categories, and categories never seen
in training, share one "other" column (when training had rare ones; otherwise an unseen category
sets no column), and a categorical column with missing training cells gets a "missing" column.
`transform` turns any table with the same columns into the `[n, F]` float matrix the network
sees. The converter writes the same steps into the ONNX graph (converter/preprocess.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnserve.errors import DataError
from bnserve.models.reading import column_text

NUMERIC, BOOLEAN, CATEGORICAL = "numeric", "boolean", "categorical"
KINDS = (NUMERIC, BOOLEAN, CATEGORICAL)
#: Cells that mean "no value" unless --missing-values says otherwise (compared after stripping).
DEFAULT_MISSING = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?")
TRUE_TEXTS = frozenset({"true", "yes", "t", "y", "1"})
FALSE_TEXTS = frozenset({"false", "no", "f", "n", "0"})
#: A category needs this many training rows to get its own one-hot column.
DEFAULT_MIN_FREQUENCY = 5
OTHER, MISSING = "<other>", "<missing>"


@dataclass
class RawTable:
    """A file's feature columns, with their names and the file they came from: numeric columns as
    float arrays (NaN = missing, as models/reading.py reads them), others as stripped text."""

    names: list[str]
    columns: list[Any]  # np.ndarray (numbers) or list[str]
    source: str

    @property
    def n_rows(self) -> int:
        return len(self.columns[0]) if self.columns else 0

    def column(self, name: str) -> Any:
        return self.columns[self.names.index(name)]

    def take(self, rows: np.ndarray) -> RawTable:
        return RawTable(self.names, [_take(c, rows) for c in self.columns], self.source)


def _take(column: Any, rows: np.ndarray) -> Any:
    return column[rows] if isinstance(column, np.ndarray) else [column[i] for i in rows]


def booleans(column: Any, missing_values: tuple[str, ...]) -> np.ndarray:
    """A boolean column as 1.0 / 0.0, NaN for missing (and for a cell that is no boolean)."""
    values = [None if c in missing_values else _boolean(c) for c in column_text(column)]
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def numbers(column: Any, missing_values: tuple[str, ...]) -> np.ndarray | None:
    """A numeric column as float64 with NaN for missing cells; None if a text cell is no number."""
    if isinstance(column, np.ndarray):
        return column.astype(np.float64, copy=False)
    out = np.empty(len(column), dtype=np.float64)
    for i, text in enumerate(column):
        if text in missing_values:
            out[i] = np.nan
            continue
        value = _number(text)
        if value is None:
            return None
        out[i] = value
    return out


def _number(text: str) -> float | None:
    """The number in `text` (inf included: numeric columns refuse it with its row), or None."""
    try:
        return float(text)
    except ValueError:
        return None


def _boolean(text: str) -> float | None:
    lowered = text.lower()
    if lowered in TRUE_TEXTS:
        return 1.0
    if lowered in FALSE_TEXTS:
        return 0.0
    return None


@dataclass
class Column:
    """One raw feature column: its kind and, once fitted, how it is encoded."""

    name: str
    kind: str
    missing_in_data: int = 0  # missing cells in the whole file (the summary shows it)
    fill: float | None = None  # numeric/boolean: the training value for a missing cell
    indicator: bool = False  # a 0/1 "was missing" feature follows the value
    categories: list[str] = field(default_factory=list)  # categorical: the kept categories
    other: bool = False  # categorical: an "other" column (rare categories in training)
    missing_column: bool = False  # categorical: a "missing" column (missing cells in training)

    def encoded_names(self) -> list[str]:
        if self.kind != CATEGORICAL:
            return [self.name] + ([f"{self.name} ({MISSING})"] if self.indicator else [])
        names = [f"{self.name}={c}" for c in self.categories]
        if self.other:
            names.append(f"{self.name}={OTHER}")
        if self.missing_column:
            names.append(f"{self.name}={MISSING}")
        return names

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        if self.kind == CATEGORICAL:
            out.update(categories=self.categories, other=self.other, missing=self.missing_column)
        else:
            out.update(fill=self.fill, indicator=self.indicator)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Column:
        kind = raw["kind"]
        if kind not in KINDS:
            raise ValueError(f"unknown column kind {kind!r}")
        if kind == CATEGORICAL:
            return cls(
                str(raw["name"]),
                kind,
                categories=[str(c) for c in raw["categories"]],
                other=bool(raw["other"]),
                missing_column=bool(raw["missing"]),
            )
        return cls(
            str(raw["name"]), kind, fill=float(raw["fill"]), indicator=bool(raw["indicator"])
        )


@dataclass
class Preprocessor:
    """The fitted encoding of raw columns into the network's features (see the module doc)."""

    columns: list[Column]
    missing_values: tuple[str, ...] = DEFAULT_MISSING
    min_frequency: int = DEFAULT_MIN_FREQUENCY

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def encoded_names(self) -> list[str]:
        return [n for c in self.columns for n in c.encoded_names()]

    def is_missing(self, text: str) -> bool:
        return text in self.missing_values

    def fit(self, table: RawTable, rows: np.ndarray) -> Preprocessor:
        """Learn fills, indicators and categories from `rows` of `table` (the training split)."""
        for col in self.columns:
            cells = _take(table.column(col.name), rows)
            if col.kind == NUMERIC:
                values = self._numeric(col, cells, table.source)
                present_values = values[~np.isnan(values)]
                col.fill = float(np.median(present_values)) if len(present_values) else 0.0
                col.indicator = len(present_values) < len(values)
                continue
            present = [c for c in cells if not self.is_missing(c)]
            missing = len(cells) - len(present)
            if col.kind == CATEGORICAL:
                counts: dict[str, int] = {}
                for c in present:
                    counts[c] = counts.get(c, 0) + 1
                col.categories = sorted(c for c, k in counts.items() if k >= self.min_frequency)
                col.other = len(col.categories) < len(counts)
                col.missing_column = missing > 0
                continue
            values = np.array([self._value(col, c) for c in present], dtype=np.float64)
            # boolean: the more frequent of 0 and 1 (ties: 0)
            col.fill = float(values.mean() > 0.5) if len(values) else 0.0
            col.indicator = missing > 0
        return self

    def _value(self, col: Column, text: str) -> float:
        value = _boolean(text)
        if value is None:
            raise DataError(f"column {col.name!r}: {text!r} is not a {col.kind} value")
        return value

    def _numeric(self, col: Column, cells: Any, source: str) -> np.ndarray:
        values = numbers(cells, self.missing_values)
        if values is None:
            bad = next(c for c in cells if c not in self.missing_values and _number(c) is None)
            raise DataError(f"{source}: column {col.name!r}: {bad!r} is not a number")
        return values

    def transform(self, table: RawTable) -> np.ndarray:
        """The `[n, F]` float64 features of every row of `table` (columns matched by name)."""
        missing = [n for n in self.names if n not in table.names]
        if missing:
            raise DataError(
                f"{table.source}: columns {', '.join(map(repr, missing))} are missing; the model "
                f"reads {', '.join(map(repr, self.names))}"
            )
        blocks = []
        bad: list[str] = []
        for col in self.columns:
            cells = table.column(col.name)
            if col.kind == CATEGORICAL:
                blocks.append(self._one_hot(col, column_text(cells)))
                continue
            if col.kind == NUMERIC:
                value = self._numeric(col, cells, table.source)
            else:
                value = np.full(len(cells), np.nan)
                for i, text in enumerate(column_text(cells)):
                    if self.is_missing(text):
                        continue
                    parsed = _boolean(text)
                    if parsed is None:
                        bad.append(f"row {i + 2}, column {col.name!r}: {text!r} is not boolean")
                        break
                    value[i] = parsed
            was_missing = np.isnan(value)
            infinite = np.flatnonzero(np.isinf(value))
            if len(infinite):
                i = int(infinite[0])
                bad.append(f"row {i + 2}, column {col.name!r}: {value[i]!r} is not a finite number")
            value = np.where(was_missing, col.fill, value)
            blocks.append(value[:, None])
            if col.indicator:
                blocks.append(was_missing[:, None].astype(np.float64))
        if bad:
            raise DataError(f"{table.source}: " + "; ".join(bad))
        return np.concatenate(blocks, axis=1)

    def _one_hot(self, col: Column, cells: list[str]) -> np.ndarray:
        width = len(col.categories) + col.other + col.missing_column
        out = np.zeros((len(cells), width), dtype=np.float64)
        index = {c: i for i, c in enumerate(col.categories)}
        for r, text in enumerate(cells):
            if self.is_missing(text):
                if col.missing_column:
                    out[r, width - 1] = 1.0
                continue
            j = index.get(text)
            if j is not None:
                out[r, j] = 1.0
            elif col.other:
                out[r, len(col.categories)] = 1.0
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "columns": [c.to_json() for c in self.columns],
            "missing_values": list(self.missing_values),
            "min_frequency": self.min_frequency,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Preprocessor:
        return cls(
            [Column.from_json(c) for c in raw["columns"]],
            tuple(str(v) for v in raw["missing_values"]),
            int(raw["min_frequency"]),
        )


# --- reading and typing a table --------------------------------------------------------------


@dataclass(frozen=True)
class ColumnOptions:
    """What the user chose about columns (train's --drop, --features, --keep-id, ...)."""

    drop: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    keep_id: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    missing_values: tuple[str, ...] = DEFAULT_MISSING
    min_frequency: int = DEFAULT_MIN_FREQUENCY


def infer_kind(cells: Any, missing_values: tuple[str, ...]) -> str:
    """numeric (0/1 columns too: they are numbers already), boolean or categorical."""
    if isinstance(cells, np.ndarray):
        return NUMERIC
    present = [c for c in cells if c not in missing_values]
    if all(_number(c) is not None for c in present):
        return NUMERIC
    if all(_boolean(c) is not None for c in present):
        return BOOLEAN
    return CATEGORICAL


ID_NAMES = frozenset({"id", "index", "idx", "row", "rowid", "row_id", "record_id"})
#: Fewer rows than this and a run of whole numbers is as likely a feature as a row number.
ID_MIN_ROWS = 50


def identifier_like(name: str, cells: Any, missing_values: tuple[str, ...]) -> str | None:
    """Why column `name` looks like a row identifier, or None."""
    if name == "" or name.lower().startswith("unnamed:"):
        return "it has no name (a written-out index, e.g. pandas' to_csv without index=False)"
    if name.lower() in ID_NAMES and len(cells) >= 2:
        text = column_text(cells)
        if len(set(text)) == len(text) and not any(c in missing_values for c in text):
            return "its name says it identifies rows and every value is different"
    if len(cells) < ID_MIN_ROWS:
        return None
    if (
        isinstance(cells, np.ndarray)
        and not (  # the first steps decide most columns at once
            np.all(np.abs(np.diff(cells[:8])) == 1) and np.all(cells[:8] == np.round(cells[:8]))
        )
    ):
        return None
    values = numbers(cells, missing_values)
    if values is None:
        return None
    if not np.isfinite(values).all() or not np.all(values == np.round(values)):
        return None
    steps = np.diff(values)
    if np.all(steps == 1) or np.all(steps == -1):
        return "its values count the rows (whole numbers, one apart, in order)"
    return None


def select_columns(
    header: list[str], columns: list[list[str]], label_index: int, options: ColumnOptions,
    source: str,
) -> tuple[list[str], list[list[str]]]:  # fmt: skip
    """The feature columns after --features / --drop, with every naming mistake reported."""
    label = header[label_index]
    unknown = [c for c in (*options.drop, *options.features, *options.keep_id) if c not in header]
    if unknown:
        raise DataError(
            f"{source}: no column {', '.join(map(repr, unknown))}; columns are: "
            + ", ".join(map(repr, header))
        )
    if label in options.features or label in options.drop:
        raise DataError(f"{source}: {label!r} is the label column; it cannot be a feature")
    if options.features:
        wanted = [h for h in options.features if h not in options.drop]
    else:
        wanted = [h for i, h in enumerate(header) if i != label_index and h not in options.drop]
    if not wanted:
        raise DataError(f"{source}: no feature columns left (check --drop / --features)")
    return wanted, [columns[header.index(h)] for h in wanted]


def type_columns(
    names: list[str],
    cells: list[list[str]],
    options: ColumnOptions,
    source: str,
    nonfinite: dict[str, int] | None = None,
) -> list[Column]:
    """Each column's kind; refuses identifier-like columns (all of them at once, with the fix).
    `nonfinite` (reading.Table.nonfinite_counts) spares scanning a complete numeric column."""
    identifiers: list[tuple[str, str]] = []
    kinds = []
    for name, column in zip(names, cells, strict=True):
        why = (
            None
            if name in options.keep_id
            else identifier_like(name, column, options.missing_values)
        )
        if why is not None:
            identifiers.append((name, why))
        kind = infer_kind(column, options.missing_values)
        if name in options.categorical:
            kind = CATEGORICAL
        if isinstance(column, np.ndarray):
            complete = nonfinite is not None and nonfinite.get(name) == 0
            missing = 0 if complete else int(np.isnan(column).sum())
        else:
            missing = sum(c in options.missing_values for c in column)
        kinds.append(Column(name, kind, missing_in_data=missing))
    if identifiers:
        names_shown = ",".join(n for n, _ in identifiers) or "''"
        raise DataError(
            f"{source}: identifier-like columns would let the model learn the row order, not the "
            f"data: {'; '.join(f'{n!r}: {why}' for n, why in identifiers)}. Drop them "
            f"(--drop {names_shown}) or keep them as features on purpose (--keep-id NAME)"
        )
    empty = [
        c.name for c, column in zip(kinds, cells, strict=True) if c.missing_in_data == len(column)
    ]
    if empty:
        raise DataError(
            f"{source}: columns with no value at all: {', '.join(map(repr, empty))}; drop them "
            "(--drop NAME)"
        )
    return kinds


def needs_preprocessing(columns: list[Column]) -> bool:
    """False when every column is a complete number: such a model keeps one float input."""
    return any(c.kind != NUMERIC or c.missing_in_data for c in columns)


def summary(columns: list[Column], label: str, label_defaulted: bool, n_rows: int) -> str:
    """The table printed before training: each column's kind and missing count, and the label."""
    width = max(len(c.name) for c in columns) + 2
    lines = [f"{n_rows} rows; label column {label!r}" + (
        " (the last column, by default: choose another with --label)" if label_defaulted else ""
    )]  # fmt: skip
    for c in columns:
        lines.append(f"  {c.name:<{width}} {c.kind:<12} missing {c.missing_in_data}")
    return "\n".join(lines)
