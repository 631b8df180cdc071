"""The parity gate of `bnserve convert` and `bnserve fold`: run the written ONNX file in
onnxruntime on probe inputs and compare every output with a float64 reference, accepting
float32's own error but nothing more.

Criterion: an output's max absolute error is <= max(atol x its scale, NOISE_FACTOR (4) x the
float32 noise floor), at ORT_DISABLE_ALL and at ORT_ENABLE_ALL, and the argmax agrees with the
reference on every row that is not a near tie. The noise floor is the largest error of
independent float32 evaluations of the same network. Each command builds a `Reference`: the
float64 outputs (the checkpoint network in numpy for convert; the input graph widened to float64
for fold), its float32 evaluations (the unfolded graph in onnxruntime first, then others, such as
the folded weights in float32, because folding can make float32 legitimately worse: a large input
mean over a small std, or a large BN scale, moves into a bias that cancels against x @ W), and
its float64 fold check. The folded weights' samples are admissible only because the fold itself
first passes that check (`FOLD_FLOAT64_TOLERANCE`), so a wrong fold cannot raise its own floor.
When no float64 reference can be computed, `Reference.float64` is False and the report's
`reference` says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from bnserve.errors import BnserveError, ModelError

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
# The gate's atol unless --atol says otherwise (absolute on probabilities, relative elsewhere).
DEFAULT_ATOL = 1e-5


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


Feeds = Array | dict[str, Array]


def run_model(model: ModelSource, X: Feeds, level: str = "disabled") -> dict[str, Array]:
    """All outputs of `model` on `X`: one array fed to its first input, or arrays by input name."""
    sess = session(model, level)
    names = [o.name for o in sess.get_outputs()]
    values = sess.run(names, X if isinstance(X, dict) else {sess.get_inputs()[0].name: X})
    return dict(zip(names, values, strict=True))


def run_checked(model: ModelSource, X: Feeds, level: str, what: str) -> dict[str, Array]:
    """`run_model`, with onnxruntime's own exception types turned into a ModelError naming `what`."""
    try:
        return run_model(model, X, level)
    except BnserveError:
        raise
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot run the {what}: {exc}") from exc


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


def format_row(row: Array, limit: int = 8) -> str:
    vals = ", ".join(f"{float(v):.6g}" for v in np.asarray(row)[:limit])
    more = f", ... ({len(row)} values)" if len(row) > limit else ""
    return f"[{vals}{more}]"


def as_rows(a: Array) -> Array:
    """`a` as a 2-D `[rows, values]` array (a scalar is one row of one value)."""
    a = np.asarray(a)
    return a.reshape(a.shape[0], -1) if a.ndim >= 1 else a.reshape(1, 1)


@dataclass
class Reference:
    """What a candidate file is judged against: by output name, the reference outputs (float64,
    unless `float64` is False and `engine` says why not), the float32 evaluations whose errors make
    the noise floor (the first is the unfolded model in onnxruntime, reported as
    `unfolded_float32_max_abs_diff`), and the report entries of the caller's float64 fold check."""

    outputs: dict[str, Array]
    float32_runs: list[dict[str, Array]]
    engine: str
    float64: bool = True
    fold_check: dict[str, float] = field(default_factory=dict)
    # One name per float32 run: when given, each output's report also says which run set the
    # noise floor, every run's error, and whether atol or the floor made the tolerance.
    float32_run_names: tuple[str, ...] = ()


def parity_gate(path: ModelSource, X: Feeds, reference: Reference, atol: float) -> ParityResult:
    """Run the file at `path` on `X` at every optimization level and judge each of its outputs
    against `reference`: floating outputs with `evaluate_parity` (atol scaled by the output's
    magnitude, so 1 for probabilities and relative for logits), others by exact equality. The
    report is the first output's, plus `reference`, `outputs` (one report per output) and the
    fold check; with named float32 runs, each output's report adds `float32_runs` (each run's
    name and error, in order), `noise_floor_source` (the run that set the floor),
    `tolerance_source` ("atol" or "noise_floor") and `noise_factor`."""
    candidate = {lv: run_checked(path, X, lv, "written model (a bnserve bug)") for lv in LEVELS}
    per_output: dict[str, Any] = {}
    failures = []
    for name, ref in reference.outputs.items():
        if not np.issubdtype(np.asarray(ref).dtype, np.floating):
            same = all(np.array_equal(out[name], ref) for out in candidate.values())
            per_output[name] = {"exact_match": same, "passed": same}
            if not same:
                failures.append(f"output {name!r}: values differ from the reference's")
            continue
        ref_rows = as_rows(ref).astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(ref_rows), initial=0.0)))
        errors = [max_abs_error(as_rows(run[name]), ref_rows)[0] for run in reference.float32_runs]
        result = evaluate_parity(
            {lv: as_rows(out[name]) for lv, out in candidate.items()},
            ref_rows,
            errors[0],
            atol * scale,
            X if not isinstance(X, dict) else None,  # raw columns: no single input row to show
            noise_floor=max(errors),
        )
        per_output[name] = {**result.report, "scale": scale}
        if reference.float32_run_names:
            per_output[name].update(_floor_sources(result.report, reference, errors))
        if not result.passed:
            detail = result.message.removeprefix("parity gate failed: ")
            failures.append(f"output {name!r}: {detail}")
    report = {
        **per_output[next(iter(reference.outputs))],
        "atol": float(atol),
        "reference": reference.engine,
        "outputs": per_output,
        **reference.fold_check,
        "passed": not failures,
    }
    message = "parity gate failed: " + "\n".join(failures) if failures else "parity ok"
    return ParityResult(passed=not failures, report=report, message=message)


def _floor_sources(
    report: dict[str, Any], reference: Reference, errors: list[float]
) -> dict[str, Any]:
    """What an output's tolerance is made of: each float32 run's error by name, the run that set
    the noise floor (the first of equal maxima), and whether atol or the floor won."""
    names = reference.float32_run_names
    worst = max(range(len(errors)), key=lambda i: errors[i])
    return {
        "float32_runs": [
            {"run": name, "max_abs_diff": err} for name, err in zip(names, errors, strict=True)
        ],
        "noise_floor_source": names[worst],
        "tolerance_source": "atol" if report["tolerance"] == report["atol"] else "noise_floor",
        "noise_factor": NOISE_FACTOR,
    }
