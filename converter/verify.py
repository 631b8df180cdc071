"""The parity gate: run an ONNX model in onnxruntime on probe inputs and compare it with a float64
reference, accepting float32's own error but nothing more.

Criterion: the candidate's max absolute probability error is <= max(atol, NOISE_FACTOR (4) x the
float32 noise floor), at ORT_DISABLE_ALL and at ORT_ENABLE_ALL, and the argmax agrees with the reference on
every row that is not a near tie. The noise floor is the largest error of independent float32
evaluations of the same network: the unfolded graph in onnxruntime, and the converter
adds the unfolded network in numpy float32 and the folded weights evaluated in numpy float32
with two summation orders, because folding can
make float32 legitimately worse (a large input mean over a small std, or a large BN scale, moves
into a bias that cancels against x @ W). Those extra samples are only admissible because the
converter first checks the fold itself in float64 (`FOLD_FLOAT64_TOLERANCE`), so a wrong fold can
not raise its own floor.

Functions are generic (any model, any reference), so `bnserve fold` can reuse them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

Array = np.ndarray
ModelSource = str | bytes | os.PathLike[str]

LEVELS: dict[str, ort.GraphOptimizationLevel] = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
PROBE_SEED = 0
# Folding is exact in real arithmetic: in float64 the folded network must reproduce the reference
# up to float64 rounding, amplified at most ~1e4 by cancellation on ill-conditioned networks.
FOLD_FLOAT64_TOLERANCE = 1e-9
# A factor of 2 was the first design. Rounding errors are random, so one set of samples underestimates
# the floor: on deep tanh networks with |gamma| ~ 10 hypothesis found a correct fold at 2.3 x.
# 4 keeps correct folds passing; a wrong fold still fails the float64 check, a wrong export
# (layout, activation, alpha) errs by orders of magnitude more.
NOISE_FACTOR = 4.0


def make_probes(
    mean: Array, std: Array, *, n_random: int = 256, n_single: int = 32, seed: int = PROBE_SEED
) -> Array:
    """Probe rows `[n, F]` float32 in raw feature units, drawn from the stored standardization.

    `mean + std * z` with z: `n_random` standard normal rows (the bulk of the data), the mean
    itself, all features at +-4 std, 32 rows of random signs at 4 std, and single features at
    +-8 std (up to `n_single` features, evenly spaced): extremes saturate activations and push
    probabilities to 0 and 1, where a wrong bias shows. Seeded: the same probes every run, so the
    parity report (and the file that carries it) is reproducible.
    """
    mean = np.asarray(mean, dtype=np.float64)
    std = np.asarray(std, dtype=np.float64)
    F = mean.shape[0]
    rng = np.random.default_rng(seed)
    z = [
        rng.standard_normal((n_random, F)),
        np.zeros((1, F)),
        np.full((1, F), 4.0),
        np.full((1, F), -4.0),
    ]
    z.append(4.0 * rng.choice([-1.0, 1.0], size=(32, F)))
    picks = np.unique(np.linspace(0, F - 1, num=min(F, n_single)).round().astype(int))
    single = np.zeros((2 * len(picks), F))
    for k, j in enumerate(picks):
        single[2 * k, j], single[2 * k + 1, j] = 8.0, -8.0
    z.append(single)
    X = mean + std * np.concatenate(z)
    # Rounded to float32 here, and the reference sees exactly these float32 values.
    return X.astype(np.float32)


def session(model: ModelSource, level: str = "disabled", threads: int = 1) -> ort.InferenceSession:
    """A CPU session; one thread by default so that results (and reports) are reproducible."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = LEVELS[level]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    src = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(src, sess_options=opts, providers=["CPUExecutionProvider"])


def run_model(model: ModelSource, X: Array, level: str = "disabled") -> dict[str, Array]:
    """All outputs of `model` on `X` (fed to its first input), by output name."""
    sess = session(model, level)
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, {sess.get_inputs()[0].name: X})
    return dict(zip(names, values, strict=True))


def max_abs_error(candidate: Array, reference: Array) -> tuple[float, int]:
    """`(max |candidate - reference|, row index of that maximum)`, NaN counted as infinite."""
    diff = np.abs(np.asarray(candidate, dtype=np.float64) - reference)
    diff = np.where(np.isnan(diff), np.inf, diff)
    per_row = diff.max(axis=1)
    row = int(np.argmax(per_row))
    return float(per_row[row]), row


def top2_gap(p: Array) -> Array:
    """Per row, the difference between the two largest probabilities."""
    if p.shape[1] < 2:
        return np.full(p.shape[0], np.inf)
    part = np.sort(p, axis=1)
    return part[:, -1] - part[:, -2]


@dataclass
class ParityResult:
    passed: bool
    report: dict[str, Any]
    message: str


def evaluate_parity(
    candidate_by_level: dict[str, Array],
    reference: Array,
    baseline_error: float,
    atol: float,
    X: Array | None = None,
    noise_floor: float | None = None,
) -> ParityResult:
    """Apply the gate's criterion to candidate probabilities (one array per optimization level)
    against float64 reference probabilities. `baseline_error` is the unfolded float32 error;
    `noise_floor` (default: `baseline_error`) the largest error of all float32 evaluations."""
    floor = float(baseline_error) if noise_floor is None else max(noise_floor, baseline_error)
    tolerance = max(float(atol), NOISE_FACTOR * floor)
    gap = top2_gap(reference)
    # If every probability is within `tolerance`, the argmax can only flip where the reference's
    # top two are within 2 * tolerance: that is a near tie, not a disagreement.
    near_tie = gap <= 2.0 * tolerance
    ref_arg = reference.argmax(axis=1)
    by_level: dict[str, float] = {}
    worst = (-1.0, 0, "")
    agreement = 1.0
    mismatches = 0
    for level, probs in candidate_by_level.items():
        err, row = max_abs_error(probs, reference)
        by_level[level] = err
        if err > worst[0]:
            worst = (err, row, level)
        same = np.asarray(probs).argmax(axis=1) == ref_arg
        agreement = min(agreement, float(same.mean()))
        mismatches = max(mismatches, int((~same & ~near_tie).sum()))
    err, row, level = worst
    passed = err <= tolerance and mismatches == 0
    report = {
        "probes": int(reference.shape[0]),
        "probe_seed": PROBE_SEED,
        "atol": float(atol),
        "tolerance": tolerance,
        "max_abs_diff": err,
        "max_abs_diff_by_level": by_level,
        "unfolded_float32_max_abs_diff": float(baseline_error),
        "float32_noise_floor": floor,
        "argmax_agreement": agreement,
        "near_ties": int(near_tie.sum()),
        "argmax_mismatches_outside_near_ties": mismatches,
        "worst_row": row,
        "passed": passed,
    }
    message = "parity ok"
    if not passed:
        cand = np.asarray(candidate_by_level[level])[row]
        parts = [
            f"parity gate failed: max |p - p_ref| = {err:.3g} at probe row {row} "
            f"(onnxruntime optimization {level}); allowed {tolerance:.3g} = max(atol {atol:.3g}, "
            f"{NOISE_FACTOR:g} x float32 noise floor {floor:.3g}; unfolded float32 error {baseline_error:.3g})",
            f"argmax disagreements outside near ties: {mismatches}",
            f"reference p = {format_row(reference[row])}",
            f"model p     = {format_row(cand)}",
        ]
        if X is not None:
            parts.append(f"input row   = {format_row(X[row])}")
        message = "\n".join(parts)
    return ParityResult(passed=passed, report=report, message=message)


def logits_parity(
    candidate_by_level: dict[str, Array],
    reference: Array,
    baseline_error: float,
    atol: float,
    noise_floor: float | None = None,
) -> dict[str, Any]:
    """The same rule for the optional logits output, with atol relative to the logits' scale
    (logits are unbounded, so an absolute 1e-5 would be meaningless for large ones), and the
    same NOISE_FACTOR x noise floor as the probabilities: with 2 x the unfolded error alone, one
    correct fold in seven of ill-conditioned networks failed on its logits while its
    probabilities passed."""
    scale = max(1.0, float(np.max(np.abs(reference))))
    floor = float(baseline_error) if noise_floor is None else max(noise_floor, baseline_error)
    tolerance = max(float(atol) * scale, NOISE_FACTOR * floor)
    err = max(max_abs_error(v, reference)[0] for v in candidate_by_level.values())
    return {
        "max_abs_diff": err,
        "unfolded_float32_max_abs_diff": float(baseline_error),
        "float32_noise_floor": floor,
        "tolerance": tolerance,
        "passed": err <= tolerance,
    }


def format_row(row: Array, limit: int = 8) -> str:
    vals = ", ".join(f"{float(v):.6g}" for v in np.asarray(row)[:limit])
    more = f", ... ({len(row)} values)" if len(row) > limit else ""
    return f"[{vals}{more}]"
