"""Requests checked against the model's training profile (`bnserve.profile`, written by the
converter from the training split): a numeric input outside `[min - k*std, max + k*std]` of
training, or a category never seen in training, is flagged in the answer, counted, or refused
(`--on-out-of-range flag|ignore|reject`, `--out-of-range-k`).

The check is two vectorized comparisons over the request's `[n, F]` numbers; only rows that are
out of range are looked at one by one, to write their warnings. Pure functions: no HTTP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnserve.service.columns import CATEGORICAL, RawColumn
from bnserve.service.errors import BadRequestError

ON_OUT_OF_RANGE = ("flag", "ignore", "reject")
MAX_WARNINGS = 20  # per request: a batch of garbage must not make a megabyte of warnings


@dataclass(frozen=True, eq=False)
class Profile:
    """The numeric inputs' training ranges (in the order the check reads them) and deciles."""

    names: tuple[str, ...]
    minimum: np.ndarray
    maximum: np.ndarray
    std: np.ndarray
    deciles: np.ndarray  # [F, 9]: the drift bins' edges (service/drift.py)
    categories: dict[str, frozenset[str]]
    _bounds: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def bounds(self, k: float) -> tuple[np.ndarray, np.ndarray]:
        """float32 `(low, high)`: the training range widened by k standard deviations (computed
        once per k: the server has one k)."""
        if k not in self._bounds:
            self._bounds[k] = (
                (self.minimum - k * self.std).astype(np.float32),
                (self.maximum + k * self.std).astype(np.float32),
            )
        return self._bounds[k]


def read_profile(
    metadata: dict[str, str], feature_names: tuple[str, ...] | None, columns: tuple | None
) -> Profile | None:
    """The profile of a model's inputs, or None (no profile, or one that does not fit them)."""
    raw = metadata.get("bnserve.profile")
    if not raw:
        return None
    try:
        entries = {e["name"]: e for e in json.loads(raw)["inputs"]}
    except (ValueError, KeyError, TypeError):
        return None
    if columns is not None:
        numeric = [c.name for c in columns if c.kind != CATEGORICAL]
        categorical = [c.name for c in columns if c.kind == CATEGORICAL]
    else:
        numeric, categorical = list(feature_names or ()), []
    if any(n not in entries or "min" not in entries[n] for n in numeric):
        return None

    def column(key: str) -> np.ndarray:
        return np.array([float(entries[n][key]) for n in numeric], dtype=np.float64)

    return Profile(
        names=tuple(numeric),
        minimum=column("min"),
        maximum=column("max"),
        std=column("std"),
        deciles=np.array([entries[n]["quantiles"] for n in numeric], dtype=np.float64).reshape(
            len(numeric), -1
        ),
        categories={
            n: frozenset(entries[n].get("frequencies", {})) for n in categorical if n in entries
        },
    )


def numbers_of(x: np.ndarray | dict[str, np.ndarray], profile: Profile) -> np.ndarray:
    """The request's numeric inputs as one `[n, F]` array in the profile's order."""
    if isinstance(x, dict):
        return np.concatenate([x[name] for name in profile.names], axis=1)
    return x


def out_of_range(
    x: np.ndarray | dict[str, np.ndarray],
    profile: Profile,
    k: float,
    columns: tuple[RawColumn, ...] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(warnings, count per input) for the request's values outside the training range and its
    unseen categories; warnings name the row, the input, the value and the range."""
    warnings: list[dict[str, Any]] = []
    counts: dict[str, int] = {}
    values = numbers_of(x, profile)
    if values.shape[1]:
        low, high = profile.bounds(k)
        outside = (values < low) | (values > high)  # NaN (missing) compares False: never flagged
        if outside.any():
            for row, j in np.argwhere(outside).tolist():
                name = profile.names[j]
                counts[name] = counts.get(name, 0) + 1
                if len(warnings) < MAX_WARNINGS:
                    warnings.append(
                        {
                            "row": row,
                            "input": name,
                            "value": float(values[row, j]),
                            "training_range": [
                                float(profile.minimum[j]),
                                float(profile.maximum[j]),
                            ],
                            "allowed": [
                                float(profile.minimum[j] - k * profile.std[j]),
                                float(profile.maximum[j] + k * profile.std[j]),
                            ],
                        }
                    )
    if isinstance(x, dict) and columns is not None:
        for column in columns:
            known = profile.categories.get(column.name)
            if column.kind != CATEGORICAL or known is None:
                continue
            for row, value in enumerate(x[column.name][:, 0].tolist()):
                if value in known or value in column.missing_texts:
                    continue
                counts[column.name] = counts.get(column.name, 0) + 1
                if len(warnings) < MAX_WARNINGS:
                    warnings.append(
                        {
                            "row": row,
                            "input": column.name,
                            "value": value,
                            "training_categories": sorted(known),
                        }
                    )
    return warnings, counts


def refuse(warnings: list[dict[str, Any]]) -> BadRequestError:
    """The 400 of `--on-out-of-range reject`, naming the first inputs out of range."""
    parts = []
    for w in warnings[:5]:
        if "allowed" in w:
            low, high = w["allowed"]
            parts.append(
                f"row {w['row']} {w['input']!r} = {w['value']:g} (allowed {low:g} to {high:g})"
            )
        else:
            parts.append(
                f"row {w['row']} {w['input']!r} = {w['value']!r} (not a training category)"
            )
    return BadRequestError(
        "inputs outside the training data (--on-out-of-range reject): " + "; ".join(parts)
    )
