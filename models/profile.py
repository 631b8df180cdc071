"""The training profile: what the model's inputs looked like in training, kept with the model.

Per numeric input (a feature of a plain model, or a numeric/boolean raw column): the count of
present values, mean, std, min, max and the deciles (10%, ..., 90%) of the training split; per
categorical raw column: each category's frequency. Folding removes the standardization from the
graph, so this is where those statistics live: the converter writes the profile into the ONNX
metadata (`bnserve.profile`) and the service checks requests against it (out-of-range flags) and
measures drift (population stability index against the training deciles).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bnserve.models.tabular import (
    BOOLEAN,
    CATEGORICAL,
    Preprocessor,
    RawTable,
    booleans,
    numbers,
)

QUANTILES = tuple(round(0.1 * i, 1) for i in range(1, 10))


#: What a numeric input's profile holds besides its name (what the service reads back).
NUMERIC_KEYS = ("count", "mean", "std", "min", "max", "quantiles")


def _numeric(
    name: str, count: int, mean: float, std: float, low: float, high: float, quantiles: Any
) -> dict[str, Any]:
    """One numeric input's profile entry, in the one layout both profiles write."""
    values = (
        count,
        float(mean),
        float(std),
        float(low),
        float(high),
        [float(q) for q in quantiles],
    )
    return {"name": name, "kind": "numeric", **dict(zip(NUMERIC_KEYS, values, strict=True))}


def numeric_entry(name: str, values: np.ndarray) -> dict[str, Any]:
    """The profile of one numeric input from its training values (NaN = missing)."""
    present = values[~np.isnan(values)].astype(np.float64)
    if len(present) == 0:
        return {"name": name, "kind": "numeric", "count": 0}
    return _numeric(
        name,
        len(present),
        present.mean(),
        present.std(),
        present.min(),
        present.max(),
        np.quantile(present, QUANTILES),
    )


#: Training rows the streaming profile keeps for its deciles (about 0.2% decile error, whatever
#: the file's size; every row of a smaller training split).
SAMPLE_ROWS = 65536


class StreamingProfile:
    """The profile of training features seen chunk by chunk (`train --stream`): count, mean,
    std, min and max exact; the deciles of a uniform sample of at most SAMPLE_ROWS rows, the rows
    with the smallest hashes (bottom-k sampling, so the sample does not depend on the row order,
    and it is every training row when there are no more than SAMPLE_ROWS)."""

    def __init__(self, names: list[str], sample_rows: int | None = None) -> None:
        self.names = names
        self.sample_rows = SAMPLE_ROWS if sample_rows is None else sample_rows
        self.n = 0
        self.sum = np.zeros(len(names))
        self.min = np.full(len(names), np.inf)
        self.max = np.full(len(names), -np.inf)
        self.sample = np.empty((0, len(names)))
        self.keys = np.empty(0)

    def add(self, X: np.ndarray, keys: np.ndarray) -> None:
        """Training rows `X` with a uniform hash in [0, 1) per row (`keys`)."""
        if len(X) == 0:
            return
        X = X.astype(np.float64, copy=False)
        self.n += len(X)
        self.sum += X.sum(axis=0)
        self.min = np.minimum(self.min, X.min(axis=0))
        self.max = np.maximum(self.max, X.max(axis=0))
        if len(self.keys) >= self.sample_rows:  # full: only rows below its largest key enter
            below = keys < self.keys.max()
            X, keys = X[below], keys[below]
        sample = np.concatenate([self.sample, X])
        keys = np.concatenate([self.keys, keys])
        if len(keys) > self.sample_rows:
            keep = np.argpartition(keys, self.sample_rows - 1)[: self.sample_rows]
            sample, keys = sample[keep], keys[keep]
        self.sample, self.keys = sample, keys

    def result(self, variance: np.ndarray) -> dict[str, Any]:
        """The profile, given the features' exact variance (the trainer's streaming moments)."""
        if self.n == 0:
            return profile_of_features(self.sample, self.names)
        quantiles = np.quantile(self.sample, QUANTILES, axis=0)
        inputs = [
            _numeric(
                name,
                self.n,
                self.sum[j] / self.n,
                np.sqrt(variance[j]),
                self.min[j],
                self.max[j],
                quantiles[:, j],
            )
            for j, name in enumerate(self.names)
        ]
        return {"quantiles": list(QUANTILES), "inputs": inputs}


def profile_of_features(X: np.ndarray, names: list[str]) -> dict[str, Any]:
    """The profile of a plain model's `[n, F]` training features."""
    return {
        "quantiles": list(QUANTILES),
        "inputs": [numeric_entry(n, X[:, j]) for j, n in enumerate(names)],
    }


def profile_of_table(table: RawTable, rows: np.ndarray, pre: Preprocessor) -> dict[str, Any]:
    """The profile of a raw-column model's training rows `rows` of `table`."""
    inputs = []
    for col in pre.columns:
        cells = table.column(col.name)
        cells = cells[rows] if isinstance(cells, np.ndarray) else [cells[i] for i in rows]
        if col.kind == CATEGORICAL:
            text = [c for c in cells if c not in pre.missing_values]
            counts: dict[str, int] = {}
            for c in text:
                counts[c] = counts.get(c, 0) + 1
            total = max(len(text), 1)
            inputs.append(
                {
                    "name": col.name,
                    "kind": "categorical",
                    "count": len(text),
                    "frequencies": {c: k / total for c, k in sorted(counts.items())},
                }
            )
            continue
        if col.kind == BOOLEAN:
            values = booleans(cells, pre.missing_values)
        else:
            values = numbers(cells, pre.missing_values)
        inputs.append(numeric_entry(col.name, values))
    return {"quantiles": list(QUANTILES), "inputs": inputs}
