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


def numeric_entry(name: str, values: np.ndarray) -> dict[str, Any]:
    """The profile of one numeric input from its training values (NaN = missing)."""
    present = values[~np.isnan(values)].astype(np.float64)
    entry: dict[str, Any] = {"name": name, "kind": "numeric", "count": len(present)}
    if len(present) == 0:
        return entry
    entry.update(
        mean=float(present.mean()),
        std=float(present.std()),
        min=float(present.min()),
        max=float(present.max()),
        quantiles=[float(q) for q in np.quantile(present, QUANTILES)],
    )
    return entry


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
