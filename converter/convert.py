"""`convert_checkpoint`: checkpoint -> verified ONNX file, the whole pipeline in one function.

load -> freeze (refuse corrupt models) -> probes and float64 reference -> fold (float64; full, or
with the input kept centred when that measures better in float32) -> build the graph -> onnx full
check -> write a temporary file next to the output -> parity gate on that file -> add the parity
report -> rename into place. Nothing is left behind when any step fails.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx

from bnserve.atomic import check_output_dir
from bnserve.converter import export, preprocess, verify
from bnserve.converter.freeze import freeze_checkpoint
from bnserve.converter.frozen import (
    FoldedMLP,
    FrozenMLP,
    fold_mlp,
    folded_logits,
    folded_probabilities,
    unfolded_report,
)
from bnserve.errors import ModelError, ParityError, UsageError
from bnserve.models.checkpoint import Checkpoint, file_sha256, load_checkpoint
from bnserve.models.layers import softmax
from bnserve.models.network import logits_eval
from bnserve.models.tabular import Preprocessor

LOGITS_SUMMARY = (
    "max_abs_diff",
    "unfolded_float32_max_abs_diff",
    "float32_noise_floor",
    "tolerance",
    "passed",
)
# The full fold is kept only if its float32 error on the probes is at most
# max(min(CENTRING_FACTOR x the unfolded graph's float32 error, verify.NOISE_FACTOR x the centred
# fold's), CENTRING_MIN_ERROR); otherwise the input means are subtracted first (a centred fold).
# The centred comparison matters where the unfolded graph is itself imprecise: its float32 means
# are coarse next to a tiny std, and a full fold 100x worse than the centred one stayed within
# 2x of it. verify.NOISE_FACTOR is the gate's own allowance between float32 evaluations of one
# network, so a full fold within it of the centred one is float32 noise, not a loss.
CENTRING_FACTOR = 2.0
CENTRING_MIN_ERROR = 1e-6
# The noise floor's float32 runs, in Reference.float32_runs order (the folded two only for a
# folded model).
UNFOLDED_RUNS = ("unfolded float32 in onnxruntime", "unfolded float32 in numpy")
FOLDED_RUNS = ("folded weights in float32 by matmul", "folded weights in float32 by einsum")


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


def float64_reference(ckpt: Checkpoint, X: np.ndarray, stats: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 logits and probabilities of the UNFOLDED checkpoint network (models/ computes them,
    independently of the fold arithmetic under test)."""
    params64 = {k: np.asarray(v, dtype=np.float64) for k, v in ckpt.params.items()}
    X64 = X.astype(np.float64)
    return logits_eval(ckpt.spec, params64, X64, stats), ckpt.predict_proba(X64, stats)


def float32_overflow(folded: FoldedMLP) -> tuple[str, np.ndarray] | None:
    """The first folded array that does not fit in float32, by name, or None."""
    for la in folded.layers:
        for key, arr in (("W", la.W), ("b", la.b)):
            with np.errstate(over="ignore"):
                as32 = arr.astype(np.float32)
            if not np.all(np.isfinite(as32)):
                return f"{la.name}.{key}", arr
    return None


def check_float32_finite(folded: FoldedMLP) -> None:
    bad = float32_overflow(folded)
    if bad is not None:
        name, arr = bad
        raise ModelError(
            f"folded {name} does not fit in float32 (max |value| {np.max(np.abs(arr)):.3g}); "
            "the BN scales are too large to fold. Try --no-fold"
        )


def _folded_float32_error(
    folded: FoldedMLP | None, X: np.ndarray, ref_probs: np.ndarray, opset: int
) -> float:
    """The candidate's float32 error in onnxruntime (`model_float32_error`), inf for a candidate
    that does not exist or does not fit in float32."""
    if folded is None or float32_overflow(folded) is not None:
        return math.inf
    return model_float32_error(export.build_folded_model(folded, opset=opset), X, ref_probs)


def model_float32_error(model: onnx.ModelProto, X: np.ndarray, ref_probs: np.ndarray) -> float:
    """A candidate graph's probabilities in onnxruntime (float32, both optimization levels, as the
    gate runs the written file) against the float64 reference: the largest absolute error."""
    data = export.serialize(model)
    return max(
        verify.max_abs_error(verify.run_model(data, X, level)[export.PROBABILITIES], ref_probs)[0]
        for level in verify.LEVELS
    )


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None  # the report is JSON without inf


def choose_fold(
    net: FrozenMLP, X: np.ndarray, ref_probs: np.ndarray, unfolded_error: float, opset: int
) -> FoldedMLP:
    """The full fold, or the fold that keeps the input centred, decided by measurement on the
    gate's probes `X` against the float64 reference probabilities (`pick_centring`).

    A full fold moves mean/std into the first bias, where a feature whose |mean| is far above its
    std (years, kelvin, timestamps) makes float32 cancel a large `x @ W'` against a large `b'`."""
    try:
        centred: FoldedMLP | None = fold_mlp(net, centred=True)
    except ValueError:  # a mean beyond float32's range: nothing to centre with
        centred = None
    return pick_centring(
        fold_mlp(net),
        centred,
        lambda f: _folded_float32_error(f, X, ref_probs, opset),
        unfolded_error,
    )


Candidate = TypeVar("Candidate")


def pick_centring(
    full: Candidate,
    centred: Candidate | None,
    float32_error: Callable[[Candidate | None], float],
    unfolded_error: float,
) -> Candidate:
    """The full fold or the centred one (each with a `report` dict), by their float32 errors.

    The full fold is kept if its float32 error is at most max(min(CENTRING_FACTOR x the unfolded
    float32 error, verify.NOISE_FACTOR x the centred float32 error), CENTRING_MIN_ERROR), so
    never above max(CENTRING_FACTOR x the unfolded float32 error, CENTRING_MIN_ERROR); otherwise
    the centred fold, unless it does no better. The fold report's `standardization` entry
    records the choice, why, and the errors."""
    full_error = float32_error(full)
    centred_error = float32_error(centred)
    factor = verify.NOISE_FACTOR
    bound = max(min(CENTRING_FACTOR * unfolded_error, factor * centred_error), CENTRING_MIN_ERROR)
    allowed = (
        f"max(min({CENTRING_FACTOR:g} x unfolded {unfolded_error:.3g}, {factor:g} x centred "
        f"{centred_error:.3g}), {CENTRING_MIN_ERROR:.0e}) = {bound:.3g}"
    )
    within = full_error <= bound
    keep_full = within or not centred_error < full_error  # centred absent or no better
    chosen = full if keep_full or centred is None else centred
    decision = f"the full fold's float32 error {full_error:.3g} {'<=' if within else '>'} {allowed}"
    if not keep_full:
        decision += ": float32 cancels x @ W' against the folded bias"
    elif not within:
        decision += ", but keeping the input centred does no better"
    chosen.report["standardization"].update(
        decision=decision,
        decision_bound=bound,
        float32_max_abs_diff={
            "full_fold": _finite_or_none(full_error),
            "centred": _finite_or_none(centred_error),
            "unfolded": _finite_or_none(unfolded_error),
        },
    )
    return chosen


def unfolded_numpy_float32(
    ckpt: Checkpoint, X: np.ndarray, stats: str
) -> tuple[np.ndarray, np.ndarray]:
    # The trainer's own forward pass with float32 parameters: one more float32 sample.
    params32 = {k: np.asarray(v, dtype=np.float32) for k, v in ckpt.params.items()}
    with np.errstate(all="ignore"):
        logits = logits_eval(ckpt.spec, params32, X, stats)
    return logits.astype(np.float64), softmax(logits)  # softmax in float32, as predict_proba


def einsum_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # Plain summation order (no BLAS): a second, independent sample of float32 rounding.
    return np.einsum("ij,jk->ik", a, b, optimize=False)


def check_fold_float64(folded: FoldedMLP, X: np.ndarray, ref_probs: np.ndarray) -> float:
    """The fold must be exact up to float64 rounding; otherwise it is a bug, whatever float32 does."""
    return check_float64(
        folded_probabilities(folded, X),
        X,
        ref_probs,
        "the folded network differs from the unfolded one",
    )


def check_float64(probs: np.ndarray, X: np.ndarray, ref_probs: np.ndarray, what: str) -> float:
    """ParityError saying `what` unless `probs` (a rewritten network's, evaluated in float64) match
    the reference within verify.FOLD_FLOAT64_TOLERANCE; returns the largest difference."""
    err, row = verify.max_abs_error(probs, ref_probs)
    if not err <= verify.FOLD_FLOAT64_TOLERANCE:
        raise ParityError(
            f"parity gate failed: {what} in float64 by "
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
) -> verify.Reference:
    """What the written file is judged against (verify.parity_gate): the checkpoint's network in
    float64 (models/ computes it, independently of the fold arithmetic under test).

    The noise floor's float32 evaluations: the unfolded graph in onnxruntime, the trainer's own
    forward pass in float32 and, for a folded model, the folded weights in float32 with two
    summation orders (`add_folded_runs`)."""
    ref_logits, ref_probs = float64_reference(ckpt, X, stats)
    onnxruntime32 = verify.run_model(export.serialize(unfolded), X)
    numpy_logits, numpy_probs = unfolded_numpy_float32(ckpt, X, stats)
    reference = verify.Reference(
        _outputs(ref_probs, ref_logits, logits),
        [onnxruntime32, _outputs(numpy_probs, numpy_logits, logits)],
        "checkpoint network in numpy, float64",
        float32_run_names=UNFOLDED_RUNS,
    )
    if folded is not None:
        add_folded_runs(reference, folded, X, logits)
    return reference


def _outputs(probs: np.ndarray, logit_values: np.ndarray, logits: bool) -> dict[str, np.ndarray]:
    """By output name, in the model's order; logits only when the model has them."""
    return {export.PROBABILITIES: probs, **({export.LOGITS: logit_values} if logits else {})}


def add_folded_runs(
    reference: verify.Reference, folded: FoldedMLP, X: np.ndarray, logits: bool
) -> None:
    """Check the fold in float64 against `reference`, then add the folded weights' float32 runs
    to its noise floor: folding can make float32 legitimately worse (a large input mean over a
    small std, when the input is not kept centred, or a large BN scale, moves into a bias that
    cancels against x @ W); those are admissible only after the fold itself passed its float64
    check."""
    ref_probs = reference.outputs[export.PROBABILITIES]
    reference.fold_check["fold_float64_max_abs_diff"] = check_fold_float64(folded, X, ref_probs)
    if logits:
        reference.fold_check["fold_float64_logits_max_rel_diff"] = _check_logits_fold_float64(
            folded, X, reference.outputs[export.LOGITS]
        )
    for mm in (np.matmul, einsum_matmul):
        reference.float32_runs.append(
            _outputs(
                folded_probabilities(folded, X, np.float32, mm),
                folded_logits(folded, X, np.float32, mm),
                logits,
            )
        )
    reference.float32_run_names += FOLDED_RUNS


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


def _write_verified(
    model: onnx.ModelProto,
    metadata: dict[str, str],
    output_path: Path,
    feeds: verify.Feeds,
    reference: verify.Reference,
    atol: float,
    logits: bool = False,
) -> dict[str, Any]:
    """Write `model` to a temporary file next to `output_path`, run the parity gate on that file,
    add its report to the metadata and rename the file into place; returns the parity report.
    On any failure (ParityError when the gate fails) nothing is left behind, not even the
    folders created for it."""
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
        result = verify.parity_gate(tmp, feeds, reference, atol)
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
    return parity


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
    X, feeds = gate_probes(pre, net.input_mean, net.input_std)
    reference = checkpoint_reference(ckpt, unfolded, None, X, chosen, logits)
    if fold:
        baseline = verify.max_abs_error(
            reference.float32_runs[0][export.PROBABILITIES],
            reference.outputs[export.PROBABILITIES],
        )[0]
        folded = choose_fold(net, X, reference.outputs[export.PROBABILITIES], baseline, opset)
        check_float32_finite(folded)
        add_folded_runs(reference, folded, X, logits)
        report = folded.report
        model = export.build_folded_model(folded, opset=opset, logits=logits)
    else:
        report = unfolded_report(net)
        model = unfolded
    metadata = export.conversion_metadata(
        labels=ckpt.class_names,
        feature_names=ckpt.feature_names,
        stats=chosen,
        fold_report=report,
        parity_report=None,
        source_sha256=file_sha256(checkpoint_path),
        data_fingerprint=ckpt.data_fingerprint,
    )
    if ckpt.profile:  # the training inputs' statistics the folded graph no longer holds
        metadata["bnserve.profile"] = export.to_json(ckpt.profile)
    return finish_conversion(
        model,
        output_path,
        metadata,
        report,
        Verification(X if feeds is None else feeds, reference, atol, logits),
        pre=pre,
        fold=fold,
        opset=opset,
        warn=warn,
    )


def gate_probes(
    pre: Preprocessor | None, mean: np.ndarray, std: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """The parity gate's probes around the standardization `mean`, `std`: the network's input
    `[n, F]` float32 and, for a raw-column model, the raw columns the written file is run on
    (missing cells and unseen categories included; else None). The candidate graphs are
    measured on the network's input, before the preprocessing nodes are put in front."""
    X = verify.make_probes(mean, std)
    if pre is None:
        return X, None
    feeds = preprocess.raw_probes(pre, mean, std, len(X), verify.PROBE_SEED)
    return preprocess.encode_probes(pre, feeds).astype(np.float32), feeds


@dataclass
class Verification:
    """What the parity gate runs the written file on and judges it against."""

    feeds: verify.Feeds
    reference: verify.Reference
    atol: float
    logits: bool = False


def finish_conversion(
    model: onnx.ModelProto,
    output_path: Path,
    metadata: dict[str, str],
    report: dict[str, Any],
    gate: Verification,
    *,
    pre: Preprocessor | None,
    fold: bool,
    opset: int,
    warn: Callable[[str], None] | None,
) -> ConversionResult:
    """The common end of `convert`: the raw-column preprocessing put in front of the network, the
    fold report's warnings passed to `warn`, the metadata set, onnx's full check, the gate on the
    written file (`_write_verified`), and the result."""
    if pre is not None:  # raw columns in, the training's preprocessing inside the graph
        preprocess.with_preprocessing(model, pre, export.INPUT_NAME)
        metadata["bnserve.preprocessing"] = export.to_json(pre.to_json())
    warnings = list(report["warnings"])
    for w in warnings:
        if warn is not None:
            warn(w)
    export.set_metadata(model, metadata)
    export.check_model(model)
    parity = _write_verified(
        model, metadata, output_path, gate.feeds, gate.reference, gate.atol, gate.logits
    )
    ops = Counter(node.op_type for node in model.graph.node)
    return ConversionResult(
        path=output_path,
        folded=fold,
        opset=opset,
        stats=metadata["bnserve.stats"],
        fold_report=report,
        parity_report=parity,
        op_counts=dict(sorted(ops.items())),
        warnings=warnings,
    )
