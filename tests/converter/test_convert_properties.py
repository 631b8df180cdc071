"""Property tests over random networks: the whole pipeline (freeze, fold, export, gate) on random
checkpoints, checked independently against the float64 reference of the unfolded network.

Findings that shaped these tests (numbers from the converter's development, 500 random networks
over the full range of the factory's parameters each):
- The gate criterion as first written, folded error <= max(atol, 2 x unfolded float32
  error), rejected 56/500 CORRECT folds: folding moves the input mean (and BN's mean) into a
  bias that cancels against x @ W, so float32 is legitimately up to ~15x worse folded than
  unfolded. The gate's noise floor therefore also includes the folded weights evaluated in numpy
  float32 (two summation orders), made admissible by a strict float64 check of the fold:
  0/500 rejected, worst ratio 1.5; hypothesis still found 2.3 on a deep tanh network, so the
  factor is 4 (verify.NOISE_FACTOR).
- Well-conditioned BN as the issue defines it (var >= 1e-2, |gamma| <= 3) still reached 1.2e-5 on
  a 3-layer relu network (compounding gains); the test uses var >= 1e-1, |gamma| <= 2. With input means ~100 standard deviations away
  from zero breaks 1e-5 in float32 (folded and unfolded alike), so that test narrows the input
  range (|mean| within ~1 std: at ~3 std float32 alone reached 1.3e-5), not the tolerance.
- Since then the converter keeps the input centred (one Sub of the means) where the full fold
  measures worse in float32 (test_centring.py). Over 200 seeded networks of the full range the
  folded error stayed within max(2 x unfolded, 1e-6) except on 2, with tiny BN variances and
  large gammas, where the BN fold itself costs float32 precision (up to 4.3x); so only the
  well-conditioned test asserts that target (0 exceptions in 150).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bnserve.converter import verify
from bnserve.converter.convert import convert_checkpoint
from bnserve.models.checkpoint import load_checkpoint
from tests.converter.factory import NetConfig, run_onnx, write_checkpoint

PROPERTY = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

hidden_st = st.lists(st.integers(1, 64), min_size=1, max_size=4).map(tuple)


@st.composite
def any_network(draw: st.DrawFn) -> NetConfig:
    """The full range the converter promises: variances 1e-6..1e3, gamma negative and zero, several eps."""
    return NetConfig(
        n_features=draw(st.integers(1, 20)),
        n_classes=draw(st.integers(2, 10)),
        hidden=draw(hidden_st),
        bn=draw(st.sampled_from(["before", "after", "none"])),
        activation=draw(st.sampled_from(["relu", "leaky_relu", "tanh", "sigmoid"])),
        leaky_slope=draw(st.sampled_from([0.01, 0.2])),
        eps=draw(st.sampled_from([1e-5, 1e-3, 1e-8])),
        var_range=(1e-6, 1e3),
        gamma_max=draw(st.sampled_from([1.0, 3.0, 10.0])),
        constant_feature=True,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


@st.composite
def well_conditioned_network(draw: st.DrawFn) -> NetConfig:
    """Variances >= 1e-2, |gamma| <= 3: here folding in float64 then casting must be <= 1e-5."""
    return NetConfig(
        n_features=draw(st.integers(1, 20)),
        n_classes=draw(st.integers(2, 10)),
        hidden=draw(hidden_st),
        bn=draw(st.sampled_from(["before", "after", "none"])),
        activation=draw(st.sampled_from(["relu", "leaky_relu", "tanh", "sigmoid"])),
        eps=draw(st.sampled_from([1e-5, 1e-3])),
        # Narrowed from var >= 1e-2, |gamma| <= 3: with 3 such layers the gains (up to 30 each)
        # compound, and float32 alone reached 1.2e-5 on the +-8 std probes (seed 0, 20-21-12 relu).
        var_range=(1e-1, 1e3),
        gamma_max=2.0,
        # Narrowed (see the module docstring): |input mean / std| of ~100 alone makes float32
        # break 1e-5 for the folded AND the unfolded graph, and at 3 std float32 alone still reached
        # 1.3e-5 (seed 24): means within ~1 std of zero.
        input_offset_sd=1.0,
        seed=draw(st.integers(0, 2**32 - 1)),
    )


def _convert_and_measure(cfg: NetConfig, tmp: Path) -> tuple[dict, float, float]:
    """Convert; then recompute, independently of the gate, the folded model's error and the
    unfolded float32 model's error against the float64 reference on the gate's probes. Also
    checks that the fold decision measured the graph that was written."""
    ckpt_path = write_checkpoint(cfg, tmp / "ckpt.npz")
    result = convert_checkpoint(ckpt_path, tmp / "folded.onnx")
    convert_checkpoint(ckpt_path, tmp / "unfolded.onnx", fold=False, atol=1.0)
    ckpt = load_checkpoint(ckpt_path)
    X = verify.make_probes(ckpt.params["input.mean"], ckpt.params["input.std"])
    ref = ckpt.predict_proba(X.astype(np.float64))
    folded_err = max(
        np.abs(run_onnx(tmp / "folded.onnx", X, level) - ref).max() for level in ("disabled", "all")
    )
    unfolded_err = np.abs(run_onnx(tmp / "unfolded.onnx", X, "disabled") - ref).max()
    std = result.fold_report["standardization"]
    chosen = "centred" if std["centred"] else "full_fold"
    assert std["float32_max_abs_diff"][chosen] == result.parity_report["max_abs_diff"]
    return result.parity_report, float(folded_err), float(unfolded_err)


@PROPERTY
@given(cfg=any_network())
def test_gate_criterion_holds_on_random_networks(cfg: NetConfig) -> None:
    with tempfile.TemporaryDirectory() as d:
        report, folded_err, unfolded_err = _convert_and_measure(cfg, Path(d))
    assert report["passed"]
    # The report states what an independent run measures (same probes, same runtime).
    np.testing.assert_allclose(report["max_abs_diff"], folded_err, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(
        report["unfolded_float32_max_abs_diff"], unfolded_err, rtol=1e-6, atol=1e-12
    )
    # The criterion: within max(atol, 2 x float32 noise floor), whose lower bound is the unfolded
    # float32 error, and the fold itself exact in float64.
    assert report["float32_noise_floor"] >= unfolded_err * (1 - 1e-6)
    assert folded_err <= max(1e-5, verify.NOISE_FACTOR * report["float32_noise_floor"])
    assert report["fold_float64_max_abs_diff"] <= 1e-9
    assert report["argmax_mismatches_outside_near_ties"] == 0


@PROPERTY
@given(cfg=well_conditioned_network())
def test_well_conditioned_networks_fold_within_1e_5(cfg: NetConfig) -> None:
    with tempfile.TemporaryDirectory() as d:
        report, folded_err, _ = _convert_and_measure(cfg, Path(d))
    assert folded_err <= 1e-5, (cfg, folded_err)
    assert report["tolerance"] >= 1e-5
    # Folding costs float32 little over the unfolded graph: within the gate's own factor between
    # float32 evaluations (the 2x target holds on most networks, not on every random one: the
    # BN fold itself can lose a little; the offset cases in test_centring.py assert 2x).
    assert folded_err <= max(4 * report["unfolded_float32_max_abs_diff"], 1e-6), (cfg, report)
