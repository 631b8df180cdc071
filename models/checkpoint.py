"""The checkpoint file: numpy arrays plus a JSON header in one `.npz`, loaded without pickle.

Layout: the array `__header__` holds UTF-8 JSON (format name and version, the network spec, the
default statistics, class and feature names, training config, data fingerprint, final metrics);
every other array is a parameter named as in `models.network`. Loading checks the format version
and every array's presence and shape, so a corrupt or truncated file fails with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bnserve.atomic import atomic_path
from bnserve.errors import CheckpointError
from bnserve.models.network import NetworkSpec, Params, expected_shapes, predict_proba
from bnserve.models.tabular import Preprocessor

FORMAT_NAME = "bnserve-checkpoint"
FORMAT_VERSION = 1
HEADER_KEY = "__header__"
STATS_KINDS = ("running", "population")


@dataclass
class Checkpoint:
    spec: NetworkSpec
    params: Params
    class_names: list[str]
    feature_names: list[str]
    stats_default: str = "running"
    config: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    # Raw tabular inputs (models/tabular.py): how raw columns become `feature_names`; None when
    # the features are the data's own numeric columns.
    preprocessor: Preprocessor | None = None
    # What the inputs looked like in training (models/profile.py); empty for older checkpoints.
    profile: dict[str, Any] = field(default_factory=dict)

    @property
    def has_population_stats(self) -> bool:
        return "hidden.0.population_mean" in self.params

    def available_stats(self) -> list[str]:
        if not self.spec.has_bn:
            return ["running"]
        return ["running", "population"] if self.has_population_stats else ["running"]

    def resolve_stats(self, stats: str | None) -> str:
        """The statistics to use: the checkpoint's default unless `stats` names others."""
        chosen = stats or self.stats_default
        if chosen not in self.available_stats():
            raise CheckpointError(
                f"this checkpoint has no {chosen} statistics "
                f"(it has: {', '.join(self.available_stats())})"
            )
        return chosen

    def predict_proba(self, X: np.ndarray, stats: str | None = None) -> np.ndarray:
        """Float64 inference-mode probabilities of the unfolded network on raw features."""
        params64 = {k: v.astype(np.float64) for k, v in self.params.items()}
        return predict_proba(self.spec, params64, X, self.resolve_stats(stats))


def save_checkpoint(ckpt: Checkpoint, path: str | os.PathLike[str]) -> None:
    """Write atomically: a temporary file in the same folder, renamed into place."""
    path = Path(path)
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "spec": ckpt.spec.to_json(),
        "stats_default": ckpt.stats_default,
        "class_names": list(ckpt.class_names),
        "feature_names": list(ckpt.feature_names),
        "config": ckpt.config,
        "data_fingerprint": ckpt.data_fingerprint,
        "metrics": ckpt.metrics,
    }
    if ckpt.preprocessor is not None:
        header["preprocessing"] = ckpt.preprocessor.to_json()
    if ckpt.profile:
        header["profile"] = ckpt.profile
    arrays = {HEADER_KEY: np.frombuffer(json.dumps(header, sort_keys=True).encode(), np.uint8)}
    arrays.update({k: np.ascontiguousarray(v) for k, v in sorted(ckpt.params.items())})
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and validate a checkpoint; any problem raises `CheckpointError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint .npz file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if HEADER_KEY not in npz.files:
                raise CheckpointError(f"{path}: not a bnserve checkpoint (no header)")
            header = json.loads(bytes(npz[HEADER_KEY]).decode("utf-8"))
            arrays = {k: npz[k] for k in npz.files if k != HEADER_KEY}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({e})") from e
    return _from_header(path, header, arrays)


def _from_header(path: Path, header: Any, arrays: dict[str, np.ndarray]) -> Checkpoint:
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a bnserve checkpoint (unknown header)")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(
            f"{path}: invalid checkpoint header (format_version {version!r} is not an integer)"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version} is newer than this bnserve reads "
            f"(up to {FORMAT_VERSION}); upgrade bnserve"
        )
    try:
        spec = NetworkSpec.from_json(header["spec"])
        stats_default = header["stats_default"]
        class_names = [str(c) for c in header["class_names"]]
        feature_names = [str(f) for f in header["feature_names"]]
        raw_columns = header.get("preprocessing")
        preprocessor = None if raw_columns is None else Preprocessor.from_json(raw_columns)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid checkpoint header ({e})") from e
    shapes = expected_shapes(spec)
    if spec.has_bn and "hidden.0.population_mean" in arrays:
        for i, width in enumerate(spec.hidden):
            shapes[f"hidden.{i}.population_mean"] = (width,)
            shapes[f"hidden.{i}.population_var"] = (width,)
    for name, shape in shapes.items():
        if name not in arrays:
            raise CheckpointError(f"{path}: missing array {name!r}")
        if arrays[name].shape != shape:
            raise CheckpointError(
                f"{path}: array {name!r} has shape {arrays[name].shape}, expected {shape}"
            )
        if arrays[name].dtype.kind != "f":
            raise CheckpointError(f"{path}: array {name!r} is {arrays[name].dtype}, expected float")
    if len(class_names) != spec.n_classes or len(feature_names) != spec.n_features:
        raise CheckpointError(f"{path}: class or feature names do not match the network's shape")
    if preprocessor is not None and preprocessor.encoded_names() != feature_names:
        raise CheckpointError(f"{path}: the preprocessing does not produce the network's features")
    if stats_default not in STATS_KINDS:
        raise CheckpointError(f"{path}: unknown default statistics {stats_default!r}")
    params = {k: arrays[k] for k in shapes}
    return Checkpoint(
        spec=spec,
        params=params,
        class_names=class_names,
        feature_names=feature_names,
        stats_default=stats_default,
        # informational parts: a damaged one must not break the consumers that read them
        config=_dict(header.get("config")),
        data_fingerprint=str(header.get("data_fingerprint", "")),
        metrics=_dict(header.get("metrics")),
        preprocessor=preprocessor,
        profile=_dict(header.get("profile")),
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
