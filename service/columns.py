"""Models that read raw table columns: the converter writes one graph input per column of the
training CSV (float `[batch, 1]` for numeric and boolean columns, NaN meaning missing; string
`[batch, 1]` for categorical ones, the empty string meaning missing) and describes them in the
`bnserve.preprocessing` metadata. This module reads that description and turns request values
(JSON numbers, strings, booleans and null; V2 tensors) into one array per input.

Pure functions: no onnxruntime, no HTTP.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from bnserve.errors import ModelError
from bnserve.service.body import json_type
from bnserve.service.errors import BadRequestError, PayloadTooLargeError

NUMERIC, BOOLEAN, CATEGORICAL = "numeric", "boolean", "categorical"
TRUE_TEXTS = frozenset({"true", "yes", "t", "y", "1"})
FALSE_TEXTS = frozenset({"false", "no", "f", "n", "0"})
MISSING_TEXT = ""  # a missing categorical cell, as the graph reads it
FLOAT = np.dtype(np.float32)
STRING = np.dtype(object)


@dataclass(frozen=True)
class RawColumn:
    """One raw input: its name, kind, the categories the model knows and the texts that mean
    missing (categorical inputs)."""

    name: str
    kind: str
    categories: tuple[str, ...] = ()
    missing_texts: frozenset[str] = frozenset({MISSING_TEXT})
    trained_with_missing: bool = False

    @property
    def dtype(self) -> np.dtype:
        return STRING if self.kind == CATEGORICAL else FLOAT

    @property
    def datatype(self) -> str:
        """The Open Inference Protocol datatype of this input."""
        return "BYTES" if self.kind == CATEGORICAL else "FP32"

    def describe(self) -> dict[str, Any]:
        """What a client needs to send this column (GET /predict, V2 model metadata)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "nullable": True}
        if self.kind == CATEGORICAL:
            out["categories"] = list(self.categories)
            out["unknown_category"] = "answered: counted as the training's 'other' categories"
        if self.kind == BOOLEAN:
            out["values"] = "true/false (also 1/0, yes/no)"
        return out


def read_columns(
    metadata: dict[str, str], inputs: list[Any], where: str
) -> tuple[RawColumn, ...] | None:
    """The raw columns of a model with `bnserve.preprocessing`, checked against its graph inputs
    (name, element type, `[batch, 1]`); None for a model without it."""
    raw = metadata.get("bnserve.preprocessing")
    if raw is None:
        return None
    try:
        spec = json.loads(raw)
        missing = frozenset({MISSING_TEXT, *(str(t) for t in spec["missing_values"])})
        columns = tuple(
            RawColumn(
                str(c["name"]),
                str(c["kind"]),
                tuple(str(v) for v in c.get("categories", ())),
                missing,
                bool(c.get("missing") or c.get("indicator")),
            )
            for c in spec["columns"]
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(
            f"{where}: bnserve.preprocessing is not a column description ({exc})"
        ) from exc
    by_name = {i.name: i for i in inputs}
    if set(by_name) != {c.name for c in columns}:
        raise ModelError(
            f"{where}: graph inputs {sorted(by_name)} differ from the described columns "
            f"{[c.name for c in columns]}"
        )
    for column in columns:
        spec_in = by_name[column.name]
        if column.kind not in (NUMERIC, BOOLEAN, CATEGORICAL):
            raise ModelError(f"{where}: column {column.name!r} has unknown kind {column.kind!r}")
        if spec_in.dtype != column.dtype or len(spec_in.shape) != 2 or spec_in.shape[1] != 1:
            raise ModelError(
                f"{where}: input {column.name!r} must be {column.dtype} [batch, 1] for a "
                f"{column.kind} column"
            )
    return columns


def cell(column: RawColumn, value: Any, where: str) -> float | str:
    """One JSON value of `column` as the graph reads it; null is missing."""
    if value is None:
        return MISSING_TEXT if column.kind == CATEGORICAL else math.nan
    kind = type(value)
    if column.kind == CATEGORICAL:
        if kind is str:
            return value
        if kind is int or (kind is float and value.is_integer()):
            return str(int(value))  # a code sent as a number: "3", as the CSV said
        raise BadRequestError(
            f"{where} must be a category (a string) or null, got a JSON {json_type(value)}; "
            f"known categories: {', '.join(column.categories) or 'none'}"
        )
    if column.kind == BOOLEAN:
        if kind is bool:
            return 1.0 if value else 0.0
        if kind in (int, float) and value in (0, 1):
            return float(value)
        if kind is str and value.lower() in TRUE_TEXTS | FALSE_TEXTS:
            return 1.0 if value.lower() in TRUE_TEXTS else 0.0
        raise BadRequestError(
            f"{where} must be true, false or null, got a JSON {json_type(value)} ({value!r})"
        )
    if kind in (int, float):
        if not math.isfinite(value) or abs(value) > 3.4e38:
            raise BadRequestError(f"{where} must be a finite float32 number, got {value!r}")
        return float(value)
    raise BadRequestError(
        f"{where} must be a number or null, got a JSON {json_type(value)} ({value!r})"
    )


def text_cell(column: RawColumn, text: str, where: str) -> float | str:
    """One CSV cell of `column` as the graph reads it; the training's missing texts are missing."""
    text = text.strip()
    if text in column.missing_texts:
        return MISSING_TEXT if column.kind == CATEGORICAL else math.nan
    if column.kind == CATEGORICAL:
        return text
    if column.kind == BOOLEAN:
        return cell(column, text, where)
    try:
        value = float(text)
    except ValueError:
        raise BadRequestError(f"{where}: {text!r} is not a number") from None
    return cell(column, value, where)


def feeds_from_rows(
    rows: list[Any], columns: tuple[RawColumn, ...], where: str
) -> dict[str, np.ndarray]:
    """One `[n, 1]` array per column from rows given as objects by column name (or arrays in
    column order). Every column must be present (null for a missing value)."""
    values: list[list[Any]] = [[] for _ in columns]
    names = [c.name for c in columns]
    index = {n: i for i, n in enumerate(names)}
    for r, row in enumerate(rows):
        here = where if len(rows) == 1 else f"{where}[{r}]"
        if isinstance(row, list):
            if len(row) != len(columns):
                raise BadRequestError(
                    f"{here}: expected {len(columns)} values in the order {names}, got {len(row)}"
                )
            pairs = zip(names, row, strict=True)
        elif isinstance(row, dict):
            unknown = [k for k in row if k not in index]
            absent = [n for n in names if n not in row]
            if unknown or absent:
                parts = []
                if absent:
                    parts.append(f"missing fields {absent} (send null for a missing value)")
                if unknown:
                    parts.append(f"unknown fields {unknown[:5]}")
                raise BadRequestError(f"{here}: {'; '.join(parts)}; the columns are {names}")
            pairs = row.items()
        else:
            raise BadRequestError(
                f"{here} must be an object of column values, got a JSON {json_type(row)}"
            )
        for name, value in pairs:
            i = index[name]
            values[i].append(cell(columns[i], value, f"{here}[{name!r}]"))
    return {
        c.name: np.array(v, dtype=c.dtype).reshape(-1, 1)
        for c, v in zip(columns, values, strict=True)
    }


def unknown_categories(
    feeds: dict[str, np.ndarray], columns: tuple[RawColumn, ...]
) -> dict[str, int]:
    """Per categorical column, how many values the model never saw in training (not missing)."""
    counts = {}
    for column in columns:
        if column.kind != CATEGORICAL:
            continue
        known = set(column.categories) | column.missing_texts
        n = sum(v not in known for v in feeds[column.name][:, 0].tolist())
        if n:
            counts[column.name] = n
    return counts


def empty_feeds(columns: tuple[RawColumn, ...], rows: int) -> dict[str, np.ndarray]:
    """`rows` rows of missing values (a warm-up run)."""
    return {
        c.name: np.full((rows, 1), MISSING_TEXT if c.kind == CATEGORICAL else np.nan, c.dtype)
        for c in columns
    }


# --- Open Inference Protocol tensors -------------------------------------------------------


def decode_column(
    tensor: dict[str, Any], binary: memoryview, column: RawColumn, max_batch: int
) -> np.ndarray:
    """One V2 input tensor of `column` as its `[n, 1]` array. Numeric and boolean columns take
    FP32/FP64 (NaN or JSON null for missing); categorical ones BYTES (JSON strings or the binary
    extension's length-prefixed elements; null or "" for missing). Shape `[n]` or `[n, 1]`."""
    where = f"input {column.name!r}"
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 2
        or any(type(d) is not int or d < 0 for d in shape)
        or (len(shape) == 2 and shape[1] != 1)
        or shape[0] < 1
    ):
        raise BadRequestError(f"{where}: expected shape [batch, 1] (or [batch]), got {shape!r}")
    n = shape[0]
    if n > max_batch:
        raise PayloadTooLargeError(f"{where}: batch of {n}, at most {max_batch} per request")
    datatype = tensor.get("datatype")
    expected = ("BYTES",) if column.kind == CATEGORICAL else ("FP32", "FP64")
    if datatype not in expected:
        raise BadRequestError(
            f"{where}: datatype {datatype!r}; a {column.kind} column takes {' or '.join(expected)}"
        )
    parameters = tensor.get("parameters") or {}
    size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
    if size is not None:
        if type(size) is not int or size > len(binary):
            raise BadRequestError(f"{where}: binary_data_size {size!r} exceeds the binary part")
        part = bytes(binary[:size])
        if column.kind == CATEGORICAL:
            values: list[Any] = _bytes_elements(part, n, where)
        else:
            dtype = np.dtype("<f4" if datatype == "FP32" else "<f8")
            if size != n * dtype.itemsize:
                raise BadRequestError(
                    f"{where}: binary_data_size {size} does not fit shape {shape}"
                )
            return np.frombuffer(part, dtype=dtype).astype(np.float32).reshape(n, 1)
    else:
        data = tensor.get("data")
        if isinstance(data, list) and data and all(type(v) is list for v in data):
            data = [v for row in data for v in row]
        if not isinstance(data, list) or len(data) != n:
            raise BadRequestError(f"{where}: 'data' must hold {n} values (its shape {shape})")
        values = data
    cells = [cell(column, v, f"{where}[{i}]") for i, v in enumerate(values)]
    return np.array(cells, dtype=column.dtype).reshape(n, 1)


def _bytes_elements(part: bytes, n: int, where: str) -> list[str]:
    """The binary extension's BYTES elements: each a 4-byte little-endian length, then the bytes."""
    out, offset = [], 0
    for _ in range(n):
        if offset + 4 > len(part):
            raise BadRequestError(f"{where}: the binary BYTES data ends after {len(out)} elements")
        (length,) = struct.unpack_from("<I", part, offset)
        offset += 4
        if offset + length > len(part):
            raise BadRequestError(f"{where}: a BYTES element runs past the binary data")
        try:
            out.append(part[offset : offset + length].decode("utf-8"))
        except UnicodeDecodeError:
            raise BadRequestError(f"{where}: BYTES elements must be UTF-8 text") from None
        offset += length
    if offset != len(part):
        raise BadRequestError(f"{where}: {len(part) - offset} bytes left after {n} elements")
    return out
