"""`bnserve fold --profile`: the training profile a folded model carries (models/profile.py's
format, `bnserve.profile`), so the service checks its requests and measures drift as it does for
a model bnserve trained. From the training data itself (its feature columns, in the model's input
order) or from a profile file: `bnserve inspect --json` of another model trained on the same
features, or the profile document itself (`{"quantiles", "inputs": [...]}`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bnserve.errors import UsageError


def training_profile(
    source: str, label: str | None, n_features: int
) -> tuple[dict[str, Any], list[str]]:
    """The profile of `source` (training data, or a .json profile) and its feature names, for a
    model of `n_features` float inputs (UsageError when they do not describe such a model)."""
    if source.lower().endswith(".json"):
        profile = _read_profile_file(Path(source))
    else:
        from bnserve.models.data import load_dataset
        from bnserve.models.profile import profile_of_features

        data = load_dataset(source, label=label)
        if data.preprocessor is not None:
            raise UsageError(
                f"--profile {source}: it has text or missing cells, but a folded model reads "
                "numbers only; give the numeric feature columns the model was trained on"
            )
        profile = profile_of_features(data.X, list(data.feature_names))
    names = [str(entry["name"]) for entry in profile["inputs"]]
    if len(names) != n_features:
        raise UsageError(
            f"--profile {source} describes {len(names)} inputs, the model takes {n_features} "
            "features"
        )
    return profile, names


def _read_profile_file(path: Path) -> dict[str, Any]:
    """A profile document: {"quantiles": [...], "inputs": [{"name", "count", "mean", "std",
    "min", "max", "quantiles"}, ...]}, checked so the service can read every entry."""
    from bnserve.models.profile import NUMERIC_KEYS  # pyarrow, through models: only when asked

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"--profile {path}: not a readable JSON file ({exc})") from None
    profile = document
    if isinstance(document, dict) and isinstance(document.get("bnserve"), dict):
        profile = document["bnserve"].get("profile")  # `bnserve inspect --json` of a model
    elif isinstance(document, dict) and "profile" in document:
        profile = document["profile"]
    inputs = profile.get("inputs") if isinstance(profile, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise UsageError(f'--profile {path}: expected a JSON object with an "inputs" list')
    for index, entry in enumerate(inputs):
        missing = [
            k for k in ("name", *NUMERIC_KEYS) if not isinstance(entry, dict) or k not in entry
        ]
        if missing:
            raise UsageError(
                f"--profile {path}: input {index} lacks {', '.join(missing)} (a numeric input's "
                f"profile has name, {', '.join(NUMERIC_KEYS)})"
            )
    return profile
