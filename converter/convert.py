"""`convert_checkpoint`: checkpoint -> verified ONNX file, the whole pipeline in one function.

load -> freeze (refuse corrupt models) -> fold (float64) -> build the graph -> onnx full check ->
write a temporary file next to the output -> parity gate on that file -> add the parity report ->
rename into place. Nothing is left behind when any step fails.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnserve.atomic import check_output_dir
from bnserve.converter import export, preprocess, verify
from bnserve.converter.freeze import freeze_checkpoint
from bnserve.converter.frozen import (
    FoldedMLP,
    fold_mlp,
    folded_logits,
    folded_probabilities,
    unfolded_report,
)
from bnserve.errors import ModelError, ParityError, UsageError
from bnserve.models.checkpoint import Checkpoint, file_sha256, load_checkpoint
from bnserve.models.layers import softmax
from bnserve.models.network import logits_eval

LOGITS_SUMMARY = (
    "max_abs_diff",
    "unfolded_float32_max_abs_diff",
    "float32_noise_floor",
    "tolerance",
    "passed",
)


@dataclass
class ConversionResult:
    path: Path
    folded: bool
    opset: int
    stats: str
    fold_report: dict[str, Any]
    parity_report: dict[str, Any]
    op_counts: dict[str, int]
    warnings: list[str] = field(default_factory=list)


def check_output_path(output: Path, checkpoint: Path | None = None) -> None:
    if output.is_dir():
        raise UsageError(
            f"output path {output} is a directory; give a file name such as {output / 'model.onnx'}"
        )
    check_output_dir(output.parent)  # a folder under a file: refuse now, not after the work
    if (
        checkpoint is not None
        and output.exists()
        and checkpoint.exists()
        and output.samefile(checkpoint)
    ):
        raise UsageError(f"output path {output} is the checkpoint itself; choose another file")


def check_options(opset: int, atol: float) -> None:
    if not export.MIN_OPSET <= opset <= export.MAX_OPSET:
        raise UsageError(
            f"--opset {opset} is not supported; choose {export.MIN_OPSET} to {export.MAX_OPSET}"
        )
    if not (math.isfinite(atol) and atol >= 0):
        raise UsageError(f"--atol must be a finite number >= 0, got {atol}")


def _reference(ckpt: Checkpoint, X: np.ndarray, stats: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 logits and probabilities of the UNFOLDED checkpoint network (models/ computes them,
    independently of the fold arithmetic under test)."""
    params64 = {k: np.asarray(v, dtype=np.float64) for k, v in ckpt.params.items()}
    X64 = X.astype(np.float64)
    return logits_eval(ckpt.spec, params64, X64, stats), ckpt.predict_proba(X64, stats)


def _check_float32_finite(model_layers: list[tuple[str, np.ndarray]]) -> None:
    for name, arr in model_layers:
        with np.errstate(over="ignore"):
            as32 = arr.astype(np.float32)
        if not np.all(np.isfinite(as32)):
            raise ModelError(
                f"folded {name} does not fit in float32 (max |value| {np.max(np.abs(arr)):.3g}); "
                "the BN scales are too large to fold. Try --no-fold"
            )


def _unfolded_numpy_float32(
    ckpt: Checkpoint, X: np.ndarray, stats: str
) -> tuple[np.ndarray, np.ndarray]:
    # The trainer's own forward pass with float32 parameters: one more float32 sample.
    params32 = {k: np.asarray(v, dtype=np.float32) for k, v in ckpt.params.items()}
    with np.errstate(all="ignore"):
        logits = logits_eval(ckpt.spec, params32, X, stats)
    return logits.astype(np.float64), softmax(logits)  # softmax in float32, as predict_proba


def _einsum_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Plain summation order (no BLAS): a second, independent sample of float32 rounding.
    return np.einsum("ij,jk->ik", a, b, optimize=False)


def _check_fold_float64(folded: FoldedMLP, X: np.ndarray, ref_probs: np.ndarray) -> float:
    """The fold must be exact up to float64 rounding; otherwise it is a bug, whatever float32 does."""
    err, row = verify.max_abs_error(folded_probabilities(folded, X), ref_probs)
    if not err <= verify.FOLD_FLOAT64_TOLERANCE:
        raise ParityError(
            f"parity gate failed: the folded network differs from the unfolded one in float64 by "
            f"{err:.3g} (allowed {verify.FOLD_FLOAT64_TOLERANCE:.0e}) at probe row {row}; "
            f"input row = {verify.format_row(X[row])}"
        )
    return err


def _check_logits_fold_float64(folded: FoldedMLP, X: np.ndarray, ref_logits: np.ndarray) -> float:
    """A fold that shifts every logit by the same amount leaves the probabilities alone, so the
    logits get their own float64 fold check (relative to their scale) before the folded weights'
    float32 logits may count as noise."""
    scale = max(1.0, float(np.max(np.abs(ref_logits))))
    err, row = verify.max_abs_error(folded_logits(folded, X), ref_logits)
    if not err <= verify.FOLD_FLOAT64_TOLERANCE * scale:
        raise ParityError(
            f"parity gate failed: the folded logits differ from the unfolded ones in float64 by "
            f"{err:.3g} (allowed {verify.FOLD_FLOAT64_TOLERANCE:.0e} x {scale:.3g}) at probe row "
            f"{row}; input row = {verify.format_row(X[row])}"
        )
    return err / scale


def checkpoint_reference(
    ckpt: Checkpoint,
    unfolded: onnx.ModelProto,
    folded: FoldedMLP | None,
    X: np.ndarray,
    stats: str,
    logits: bool,
    feeds: dict[str, np.ndarray] | None = None,
) -> verify.Reference:
    """What the written file is judged against (verify.parity_gate): the checkpoint's network in
    float64 (models/ computes it, independently of the fold arithmetic under test).

    The noise floor's float32 evaluations: the unfolded graph in onnxruntime, the trainer's own
    forward pass in float32 and, for a folded model, the folded weights in float32 with two
    summation orders, because folding can make float32 legitimately worse (a large input mean
    over a small std, or a large BN scale, moves into a bias that cancels against x @ W); those
    are admissible only after the fold itself passed its float64 check. `X` is the network's
    input; `feeds` the raw columns a model with preprocessing reads (X is their encoding)."""
    ref_logits, ref_probs = _reference(ckpt, X, stats)
    onnxruntime32 = verify.run_model(export.serialize(unfolded), X if feeds is None else feeds)
    numpy_logits, numpy_probs = _unfolded_numpy_float32(ckpt, X, stats)

    def outputs(probs: np.ndarray, logit_values: np.ndarray) -> dict[str, np.ndarray]:
        """By output name, in the model's order; logits only when the model has them."""
        return {export.PROBABILITIES: probs, **({export.LOGITS: logit_values} if logits else {})}

    runs = [onnxruntime32, outputs(numpy_probs, numpy_logits)]
    fold_check: dict[str, float] = {}
    if folded is not None:
        fold_check["fold_float64_max_abs_diff"] = _check_fold_float64(folded, X, ref_probs)
        if logits:
            fold_check["fold_float64_logits_max_rel_diff"] = _check_logits_fold_float64(
                folded, X, ref_logits
            )
        for mm in (np.matmul, _einsum_matmul):
            runs.append(
                outputs(
                    folded_probabilities(folded, X, np.float32, mm),
                    folded_logits(folded, X, np.float32, mm),
                )
            )
    return verify.Reference(
        outputs(ref_probs, ref_logits),
        runs,
        "checkpoint network in numpy, float64",
        fold_check=fold_check,
    )


def _make_parents(directory: Path) -> list[Path]:
    """Create missing parent folders; return those created (innermost first) to undo on failure."""
    created = []
    d = directory
    while not d.exists():
        created.append(d)
        d = d.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_created(created)
        raise UsageError(f"{directory}: cannot create the output folder ({e.strerror or e})") from e
    return created


def _remove_created(created: list[Path]) -> None:
    for d in created:
        try:
            d.rmdir()
        except OSError:
            break


def convert_checkpoint(
    checkpoint_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    opset: int = export.DEFAULT_OPSET,
    fold: bool = True,
    stats: str | None = None,
    atol: float = verify.DEFAULT_ATOL,
    logits: bool = False,
    warn: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert, verify and write; raise a BnserveError (nothing written) on any refusal."""
    checkpoint_path, output_path = Path(checkpoint_path), Path(output_path)
    check_output_path(output_path, checkpoint_path)
    check_options(opset, atol)
    ckpt = load_checkpoint(checkpoint_path)
    net, chosen = freeze_checkpoint(ckpt, stats)
    pre = ckpt.preprocessor
    if pre is not None:
        preprocess.check_opset(pre, opset)

    unfolded = export.build_unfolded_model(net, opset=opset, logits=logits)
    folded: FoldedMLP | None = None
    if fold:
        folded = fold_mlp(net)
        _check_float32_finite(
            [(f"{la.name}.{k}", a) for la in folded.layers for k, a in (("W", la.W), ("b", la.b))]
        )
        report = folded.report
        model = export.build_folded_model(folded, opset=opset, logits=logits)
    else:
        report = unfolded_report(net)
        model = unfolded
    if pre is not None:  # raw columns in, the training's preprocessing inside the graph
        preprocess.with_preprocessing(unfolded, pre, export.INPUT_NAME)
        if model is not unfolded:
            preprocess.with_preprocessing(model, pre, export.INPUT_NAME)
    warnings = list(report["warnings"])
    for w in warnings:
        if warn is not None:
            warn(w)

    metadata = export.conversion_metadata(
        labels=ckpt.class_names,
        feature_names=ckpt.feature_names,
        stats=chosen,
        fold_report=report,
        parity_report=None,
        source_sha256=file_sha256(checkpoint_path),
        data_fingerprint=ckpt.data_fingerprint,
    )
    if pre is not None:
        metadata["bnserve.preprocessing"] = export.to_json(pre.to_json())
    export.set_metadata(model, metadata)
    export.check_model(model)

    X = verify.make_probes(net.input_mean, net.input_std)
    feeds = None
    if pre is not None:  # probes of the raw columns (missing cells, unseen categories included)
        feeds = preprocess.raw_probes(pre, net.input_mean, net.input_std, len(X), verify.PROBE_SEED)
        X = preprocess.encode_probes(pre, feeds).astype(np.float32)
    reference = checkpoint_reference(ckpt, unfolded, folded, X, chosen, logits, feeds)

    created = _make_parents(output_path.parent)
    try:
        fd, tmp_name = tempfile.mkstemp(
            dir=output_path.parent, prefix=f".{output_path.name}.", suffix=".tmp"
        )
    except OSError as e:  # e.g. permission denied: the user's to fix, not a traceback
        _remove_created(created)
        raise UsageError(f"{output_path}: cannot write the output ({e.strerror or e})") from e
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(export.serialize(model))
        # The gate runs the file actually written, at both optimization levels.
        result = verify.parity_gate(tmp, X if feeds is None else feeds, reference, atol)
        if not result.passed:
            raise ParityError(result.message)
        parity = result.report
        if logits:  # the summary `inspect` and older readers show for the logits
            entry = parity["outputs"][export.LOGITS]
            parity["logits"] = {key: entry[key] for key in LOGITS_SUMMARY}
        metadata["bnserve.parity_report"] = export.to_json(parity)
        export.set_metadata(model, metadata)
        tmp.write_bytes(export.serialize(model))
        # mkstemp creates the file 0600; a model is meant to be read by the service (often another
        # user in a container), so give it the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, output_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_created(created)
        raise
    ops = Counter(node.op_type for node in model.graph.node)
    return ConversionResult(
        path=output_path,
        folded=fold,
        opset=opset,
        stats=chosen,
        fold_report=report,
        parity_report=parity,
        op_counts=dict(sorted(ops.items())),
        warnings=warnings,
    )
