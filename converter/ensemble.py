"""`convert_ensemble`: an ensemble manifest (`bnserve train --ensemble K`) -> one verified ONNX graph.

The same pipeline as `convert_checkpoint`, for K members at once: load the manifest and its members
(each file checked against its recorded sha256) -> freeze every member -> probes and the float64
reference, the mean of the members' probabilities -> fold every member (full, or all centred on
one shared float32 centre, decided by measuring the fused graph in float32) -> fuse them side by
side (converter/fuse.py) and build the graph in the chosen layout -> the raw-column preprocessing
once in front -> parity gate on the written file -> rename into place.

The served interface is a single model's: input `input` `[batch, F]` (or one input per raw
column), output `probabilities` `[batch, C]`, the same labels; `bnserve.ensemble` in the metadata
lists the members (seed, checkpoint sha256) and whether they were bagged.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bnserve.converter import export, fuse, preprocess, verify
from bnserve.converter.convert import (
    FOLDED_RUNS,
    UNFOLDED_RUNS,
    ConversionResult,
    Verification,
    check_float32_finite,
    check_float64,
    check_fold_float64,
    check_options,
    check_output_path,
    einsum_matmul,
    finish_conversion,
    float32_overflow,
    float64_reference,
    gate_probes,
    model_float32_error,
    pick_centring,
    unfolded_numpy_float32,
)
from bnserve.converter.freeze import freeze_checkpoint
from bnserve.converter.frozen import (
    FoldedMLP,
    FrozenMLP,
    fold_mlp,
    folded_probabilities,
    unfolded_report,
)
from bnserve.errors import ModelError, UsageError
from bnserve.models.checkpoint import file_sha256
from bnserve.models.ensemble import Ensemble, load_ensemble, manifest_path


def ensemble_reference(
    ens: Ensemble, stats: list[str], unfolded: bytes, X: np.ndarray
) -> tuple[verify.Reference, list[np.ndarray]]:
    """What the written file is judged against: the mean of the members' probabilities, each
    member's checkpoint network in float64 (models/ computes them); the noise floor's float32
    runs are the unfolded ensemble graph in onnxruntime and the members' own float32 forward
    passes, averaged. Also returns each member's float64 probabilities (its fold check)."""
    pairs = list(zip(ens.checkpoints, stats, strict=True))
    members = [float64_reference(c, X, s)[1] for c, s in pairs]
    numpy32 = np.mean([unfolded_numpy_float32(c, X, s)[1] for c, s in pairs], axis=0)
    reference = verify.Reference(
        {export.PROBABILITIES: np.mean(members, axis=0)},
        [verify.run_model(unfolded, X), {export.PROBABILITIES: numpy32}],
        f"mean of the {len(members)} members' checkpoint networks in numpy, float64",
        float32_run_names=UNFOLDED_RUNS,
    )
    return reference, members


@dataclass
class _Candidate:
    """One way to fold the members (all fully, or all centred on one centre) and its report."""

    members: list[FoldedMLP]
    report: dict[str, Any]

    @classmethod
    def fold(cls, nets: list[FrozenMLP], center: np.ndarray | None) -> _Candidate:
        members = [fold_mlp(n, centred=center is not None, center=center) for n in nets]
        return cls(members, fuse.ensemble_report([m.report for m in members]))

    def fused(self) -> fuse.FusedEnsemble | None:
        """The members side by side, or None when a member's folded weights overflow float32."""
        if any(float32_overflow(m) is not None for m in self.members):
            return None
        return fuse.fuse(self.members, self.report)


def add_fused_runs(
    reference: verify.Reference,
    fused: fuse.FusedEnsemble,
    members: list[FoldedMLP],
    member_probs: list[np.ndarray],
    X: np.ndarray,
) -> None:
    """Check every member's fold, then the fused arrays the graph is built from, in float64
    against the reference; then add the fused weights' float32 evaluations (two summation
    orders) to the noise floor. The fused arrays are evaluated member by member, each member's
    layers taken back out of them (`FusedEnsemble.member`), and averaged."""
    worst = max(check_fold_float64(m, X, p) for m, p in zip(members, member_probs, strict=True))
    reference.fold_check["members_fold_float64_max_abs_diff"] = worst
    taken_back = [fused.member(k) for k in range(fused.size)]

    def mean_probabilities(*evaluation: Any) -> np.ndarray:
        return np.mean([folded_probabilities(m, X, *evaluation) for m in taken_back], axis=0)

    reference.fold_check["fold_float64_max_abs_diff"] = check_float64(
        mean_probabilities(),
        X,
        reference.outputs[export.PROBABILITIES],
        "the fused ensemble differs from the mean of its members",
    )
    for mm in (np.matmul, einsum_matmul):
        reference.float32_runs.append({export.PROBABILITIES: mean_probabilities(np.float32, mm)})
    reference.float32_run_names += FOLDED_RUNS


def convert_ensemble(
    source: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    opset: int = export.DEFAULT_OPSET,
    fold: bool = True,
    stats: str | None = None,
    atol: float = verify.DEFAULT_ATOL,
    layout: str = export.DEFAULT_LAYOUT,
    warn: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert the ensemble at `source` (its `ensemble.json`, or the folder holding it) into one
    verified graph; raise a BnserveError (nothing written) on any refusal."""
    manifest, output_path = manifest_path(source), Path(output_path)
    check_output_path(output_path, manifest)
    check_options(opset, atol)
    if layout not in export.ENSEMBLE_LAYOUTS:
        raise UsageError(f"--layout must be one of {', '.join(export.ENSEMBLE_LAYOUTS)}")
    ens = load_ensemble(manifest)
    frozen = [freeze_checkpoint(c, stats) for c in ens.checkpoints]
    nets, chosen = [n for n, _ in frozen], [s for _, s in frozen]
    try:
        fuse.check_same_shape(nets)
    except ValueError as e:
        raise ModelError(f"{manifest}: {e}") from e
    first = ens.checkpoints[0]
    pre = first.preprocessor
    if pre is not None:
        preprocess.check_opset(pre, opset)

    unfolded = export.build_unfolded_ensemble(nets, opset=opset)
    # probes around the members' standardizations (they differ a little with bagging)
    mean = np.mean([n.input_mean for n in nets], axis=0)
    X, feeds = gate_probes(pre, mean, np.mean([n.input_std for n in nets], axis=0))
    reference, member_probs = ensemble_reference(ens, chosen, export.serialize(unfolded), X)
    ref_probs = reference.outputs[export.PROBABILITIES]
    if fold:
        try:
            centred: _Candidate | None = _Candidate.fold(nets, fuse.shared_center(nets))
        except ValueError:  # means beyond float32's range: nothing to centre with
            centred = None

        def float32_error(candidate: _Candidate | None) -> float:
            fused = None if candidate is None else candidate.fused()
            if fused is None:
                return math.inf
            model = export.build_fused_model(fused, layout=layout, opset=opset)
            return model_float32_error(model, X, ref_probs)

        baseline = verify.max_abs_error(reference.float32_runs[0][export.PROBABILITIES], ref_probs)
        chosen_fold = pick_centring(
            _Candidate.fold(nets, None), centred, float32_error, baseline[0]
        )
        for m in chosen_fold.members:
            check_float32_finite(m)
        fused = fuse.fuse(chosen_fold.members, chosen_fold.report)
        fused.report["ensemble"]["layout"] = layout
        add_fused_runs(reference, fused, chosen_fold.members, member_probs, X)
        report = fused.report
        model = export.build_fused_model(fused, layout=layout, opset=opset)
    else:
        report = fuse.ensemble_report([unfolded_report(n) for n in nets])
        model = unfolded
    metadata = export.conversion_metadata(
        labels=first.class_names,
        feature_names=first.feature_names,
        stats=chosen[0] if len(set(chosen)) == 1 else ",".join(chosen),
        fold_report=report,
        parity_report=None,
        source_sha256=file_sha256(ens.path),
        data_fingerprint=first.data_fingerprint,
    )
    if first.profile:  # every member saw the same training split
        metadata["bnserve.profile"] = export.to_json(first.profile)
    metadata["bnserve.ensemble"] = export.to_json(
        {
            "size": len(nets),
            "combine": fuse.COMBINE,
            "layout": layout if fold else "unfolded",
            "bagging": ens.bagging,
            "members": [
                {"index": k, "seed": seed, "checkpoint_sha256": digest, "stats": s}
                for k, (seed, digest, s) in enumerate(
                    zip(ens.seeds, ens.sha256, chosen, strict=True)
                )
            ],
        }
    )
    gate = Verification(X if feeds is None else feeds, reference, atol)
    return finish_conversion(
        model, output_path, metadata, report, gate, pre=pre, fold=fold, opset=opset, warn=warn
    )
