"""Ensembles: K networks trained with different seeds on one split, their softmax outputs averaged.

`train_ensemble` cuts the data once (the split of `--seed`, as a single run cuts it), fits a raw
table's preprocessing once on that training split, and trains the members in worker processes
(the pool `bnserve tune` runs its trials in), each with its own seed and, with bagging, its own
bootstrap sample of the training rows. Every member sees the same train / validation / test rows
and the same encoded features, so the members, and the ensemble, are scored on the same rows.

On disk (`write_ensemble`): one folder per member (`member-0/checkpoint.npz`, `metrics.json`,
`history.csv`, ...) and the manifest `ensemble.json`: the members' files with their sha256, seeds,
bagging, each member's and the ensemble's validation and test figures. `load_ensemble` reads it
back, checks every member file against its recorded sha256 and that the members describe the same
data (classes, features, preprocessing); `bnserve convert` builds one ONNX graph from it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bnserve.atomic import write_text_atomic
from bnserve.errors import CheckpointError
from bnserve.models.checkpoint import Checkpoint, file_sha256, load_checkpoint
from bnserve.models.data import Dataset
from bnserve.models.train import (
    Splits,
    TrainConfig,
    TrainResult,
    split_data,
    split_generator,
    train,
)
from bnserve.models.tune import trial_pool, trial_seed

MANIFEST = "ensemble.json"
FORMAT_NAME = "bnserve-ensemble"
FORMAT_VERSION = 1
COMBINE = "mean of the members' softmax probabilities"


def member_dir(index: int) -> str:
    return f"member-{index}"


def member_seed(seed: int, index: int) -> int:
    """Member `index`'s training seed, derived from the ensemble's `seed` (as tune derives its
    trials' seeds); the data split stays the one `seed` cuts."""
    return trial_seed(seed, index)


def average_proba(
    checkpoints: list[Checkpoint], X: np.ndarray, stats: str | None = None
) -> np.ndarray:
    """The ensemble's float64 probabilities: the mean of the members' `predict_proba` (each with
    its default statistics unless `stats` names others)."""
    return np.mean([c.predict_proba(X, stats) for c in checkpoints], axis=0)


def scores(probs: np.ndarray, y: np.ndarray | None) -> tuple[float | None, float | None]:
    """`(loss, accuracy)` of probabilities against labels; `(None, None)` without rows."""
    if y is None or len(y) == 0:
        return None, None
    picked = np.maximum(probs[np.arange(len(y)), y], np.finfo(np.float64).tiny)
    return 0.0 - float(np.log(picked).mean()), float((probs.argmax(axis=1) == y).mean())


@dataclass
class EnsembleResult:
    config: TrainConfig  # the ensemble's (its seed cuts the split)
    members: list[TrainResult]
    seeds: list[int]
    metrics: dict[str, Any]
    splits: Splits | None = None  # the rows every member was trained and scored on


def _train_member(config: TrainConfig, data: Dataset) -> TrainResult:
    return train(config, data)


def train_ensemble(
    config: TrainConfig,
    data: Dataset,
    size: int,
    *,
    jobs: int = 1,
    on_member: Callable[[int, TrainResult], None] | None = None,
) -> EnsembleResult:
    """Train `size` members of `config` (bagging when `config.bagging`) on `data`, in `jobs`
    processes, and score their average on the shared validation and test rows."""
    split_seed = config.seed if config.split_seed is None else config.split_seed
    # The split, and a raw table's preprocessing fitted on its training rows, once for everyone:
    # the members get the encoded data (no table left to fit), cut again by the same split seed.
    splits = split_data(data, config, split_generator(split_seed))
    shared = replace(data, table=None)
    seeds = [member_seed(config.seed, i) for i in range(size)]
    configs = [replace(config, seed=s, split_seed=split_seed) for s in seeds]
    results: dict[int, TrainResult] = {}
    if jobs <= 1 or size == 1:
        for i, member in enumerate(configs):
            results[i] = _train_member(member, shared)
            if on_member:
                on_member(i, results[i])
    else:
        with trial_pool(min(jobs, size), None) as (submit, completed):
            futures = {submit(_train_member, member, shared): i for i, member in enumerate(configs)}
            for future in completed(futures):
                i = futures[future]
                results[i] = future.result()
                if on_member:
                    on_member(i, results[i])
    members = [results[i] for i in range(size)]
    checkpoints = [m.checkpoint for m in members]
    metrics: dict[str, Any] = {}
    for part, X, y in (
        ("val", splits.X_val, splits.y_val),
        ("test", splits.X_test, splits.y_test),
    ):
        has_rows = y is not None and len(y) > 0
        probs = average_proba(checkpoints, X) if has_rows else None
        loss, accuracy = scores(probs, y) if probs is not None else (None, None)
        member_acc = [m.metrics[f"{part}_accuracy"] for m in members]
        known = [a for a in member_acc if a is not None and not math.isnan(a)]
        metrics.update(
            {
                f"{part}_accuracy": accuracy,
                f"{part}_loss": loss,
                f"n_{part}": 0 if y is None else len(y),
                f"members_mean_{part}_accuracy": float(np.mean(known)) if known else None,
                f"members_best_{part}_accuracy": max(known) if known else None,
            }
        )
    return EnsembleResult(config, members, seeds, metrics, splits)


MEMBER_FIGURES = (
    "val_accuracy", "val_loss", "test_accuracy", "test_loss", "train_accuracy", "epochs",
    "best_epoch", "diverged", "n_train", "n_train_distinct", "train_rows_sha256",
)  # fmt: skip


def write_ensemble(
    result: EnsembleResult,
    out: Path,
    write_member: Callable[[TrainResult, Path], None],
) -> Path:
    """Write every member with `write_member(result, folder)` (its checkpoint.npz and whatever
    else a single run writes), then the manifest, last, so that a manifest always names complete
    member files. Returns the manifest's path."""
    entries = []
    for i, (member, seed) in enumerate(zip(result.members, result.seeds, strict=True)):
        folder = out / member_dir(i)
        folder.mkdir(parents=True, exist_ok=True)
        write_member(member, folder)
        checkpoint = folder / "checkpoint.npz"
        entries.append(
            {
                "index": i,
                "checkpoint": f"{member_dir(i)}/checkpoint.npz",
                "sha256": file_sha256(checkpoint),
                "seed": seed,
                **{k: member.metrics[k] for k in MEMBER_FIGURES if k in member.metrics},
            }
        )
    first = result.members[0].checkpoint
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "size": len(result.members),
        "seed": result.config.seed,
        "split_seed": first.config.get("split_seed"),
        "bagging": result.config.bagging,
        "combine": COMBINE,
        "data": first.config.get("data"),
        "data_fingerprint": first.data_fingerprint,
        "class_names": list(first.class_names),
        "metrics": result.metrics,
        "members": entries,
        "config": result.config.to_json(),
    }
    path = out / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=2) + "\n")
    return path


@dataclass
class Ensemble:
    """A written ensemble: its manifest and the members' checkpoints, in member order."""

    path: Path  # the manifest
    manifest: dict[str, Any]
    checkpoints: list[Checkpoint]
    paths: list[Path]
    sha256: list[str]

    @property
    def seeds(self) -> list[int]:
        return [int(m["seed"]) for m in self.manifest["members"]]

    @property
    def bagging(self) -> bool:
        return bool(self.manifest.get("bagging"))


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """The manifest of `path`: itself, or `ensemble.json` in a folder."""
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def is_ensemble(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names an ensemble: a folder holding `ensemble.json`, or a `.json` file."""
    path = Path(path)
    return (path / MANIFEST).is_file() if path.is_dir() else path.suffix.lower() == ".json"


def load_ensemble(path: str | os.PathLike[str]) -> Ensemble:
    """Read the manifest at `path` (or in the folder `path`) and its members; CheckpointError
    naming the file for a missing or unreadable manifest, a newer format, a member file that is
    missing or changed since the manifest was written, or members of different data."""
    path = manifest_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such ensemble manifest (bnserve train --ensemble K)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not an ensemble manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a bnserve ensemble manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: ensemble format version {version!r} is not one this bnserve reads "
            f"(up to {FORMAT_VERSION})"
        )
    members = manifest.get("members")
    if not isinstance(members, list) or not members:
        raise CheckpointError(f"{path}: the manifest lists no members")
    checkpoints, paths, digests = [], [], []
    for entry in members:
        try:
            member = path.parent / str(entry["checkpoint"])
            recorded = str(entry["sha256"])
            int(entry["seed"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: invalid member entry {entry!r} ({e})") from e
        if not member.is_file():
            raise CheckpointError(f"{path}: member file {member} is missing")
        digest = file_sha256(member)
        if digest != recorded:
            raise CheckpointError(
                f"{member}: changed since {path.name} was written (sha256 {digest[:12]}..., "
                f"the manifest records {recorded[:12]}...); train the ensemble again"
            )
        checkpoints.append(load_checkpoint(member))
        paths.append(member)
        digests.append(digest)
    _check_same_data(path, checkpoints, paths)
    return Ensemble(path, manifest, checkpoints, paths, digests)


def _check_same_data(path: Path, checkpoints: list[Checkpoint], paths: list[Path]) -> None:
    """Members must read the same features and answer the same classes to be averaged."""
    first = checkpoints[0]
    pre = None if first.preprocessor is None else first.preprocessor.to_json()
    for ckpt, member in zip(checkpoints[1:], paths[1:], strict=True):
        differs = [
            what
            for what, same in (
                ("class names", ckpt.class_names == first.class_names),
                ("feature names", ckpt.feature_names == first.feature_names),
                (
                    "preprocessing",
                    (None if ckpt.preprocessor is None else ckpt.preprocessor.to_json()) == pre,
                ),
            )
            if not same
        ]
        if differs:
            raise CheckpointError(
                f"{path}: {member} differs from {paths[0]} in its {', '.join(differs)}; the "
                "members of an ensemble must read the same inputs and answer the same classes"
            )
