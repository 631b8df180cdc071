"""The pure fold functions against the unfolded computation, in float64."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bnserve.converter import fold
from bnserve.models.layers import batchnorm_forward_eval

SETTINGS = settings(max_examples=60, deadline=None)


def _bn_case(seed: int, n_in: int, n_out: int, gamma_zero: bool = True):
    rng = np.random.default_rng(seed)
    W = rng.normal(0, 1, (n_in, n_out))
    b = rng.normal(0, 1, n_out)
    gamma = rng.uniform(-3, 3, n_out)
    if gamma_zero:
        gamma[0] = 0.0
    beta = rng.normal(0, 1, n_out)
    mean = rng.normal(0, 2, n_out)
    var = 10 ** rng.uniform(-6, 3, n_out)
    x = rng.normal(0, 1, (9, n_in))
    return x, W, b, gamma, beta, mean, var


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n_in=st.integers(1, 12),
    n_out=st.integers(1, 12),
    eps=st.sampled_from([1e-8, 1e-5, 1e-3]),
    with_bias=st.booleans(),
)
def test_fold_into_preceding_equals_linear_then_bn(seed, n_in, n_out, eps, with_bias):
    x, W, b, gamma, beta, mean, var = _bn_case(seed, n_in, n_out)
    b = b if with_bias else None
    z = x @ W + (b if b is not None else 0.0)
    expected = batchnorm_forward_eval(z, gamma, beta, mean, var, eps)
    W2, b2 = fold.fold_bn_into_preceding_linear(W, b, gamma, beta, mean, var, eps)
    np.testing.assert_allclose(
        x @ W2 + b2, expected, rtol=1e-10, atol=1e-9 * np.abs(expected).max()
    )


@SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    n_in=st.integers(1, 12),
    n_out=st.integers(1, 12),
    eps=st.sampled_from([1e-8, 1e-5, 1e-3]),
)
def test_fold_into_following_equals_bn_then_linear(seed, n_in, n_out, eps):
    # Here the BN acts on the n_in features that feed W_next.
    rng = np.random.default_rng(seed)
    a = np.maximum(rng.normal(0, 1, (9, n_in)), 0)  # an activation's output
    W, b = rng.normal(0, 1, (n_in, n_out)), rng.normal(0, 1, n_out)
    gamma, beta = rng.uniform(-3, 3, n_in), rng.normal(0, 1, n_in)
    gamma[0] = 0.0
    mean, var = rng.normal(0, 2, n_in), 10 ** rng.uniform(-6, 3, n_in)
    expected = batchnorm_forward_eval(a, gamma, beta, mean, var, eps) @ W + b
    W2, b2 = fold.fold_bn_into_following_linear(W, b, gamma, beta, mean, var, eps)
    np.testing.assert_allclose(
        a @ W2 + b2, expected, rtol=1e-10, atol=1e-9 * np.abs(expected).max()
    )


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), n_in=st.integers(1, 12), n_out=st.integers(1, 12))
def test_standardization_fold_equals_standardize_then_linear(seed, n_in, n_out):
    rng = np.random.default_rng(seed)
    x = rng.normal(3, 10, (9, n_in))
    mean, std = rng.normal(3, 10, n_in), 10 ** rng.uniform(-2, 2, n_in)
    std[0] = 1.0  # a constant feature
    W, b = rng.normal(0, 1, (n_in, n_out)), rng.normal(0, 1, n_out)
    expected = ((x - mean) / std) @ W + b
    W2, b2 = fold.fold_standardization_into_first_linear(W, b, mean, std)
    np.testing.assert_allclose(
        x @ W2 + b2, expected, rtol=1e-10, atol=1e-9 * np.abs(expected).max()
    )


def test_formulas_of_the_issue():
    # W' = s * W, b' = s * (b - mu) + beta, with b = 0 when the layer has no bias.
    _, W, _, gamma, beta, mean, var = _bn_case(1, 4, 3)
    eps = 1e-5
    s = gamma / np.sqrt(var + eps)
    W2, b2 = fold.fold_bn_into_preceding_linear(W, None, gamma, beta, mean, var, eps)
    np.testing.assert_array_equal(W2, W * s)
    np.testing.assert_allclose(b2, s * (0 - mean) + beta, rtol=1e-15)
    assert np.all(W2[:, 0] == 0)  # gamma 0: the unit outputs beta whatever the input
    # Following: W_next' = W_next * s (per input row), b_next' = b_next + W_next^T t.
    t = beta - s * mean
    Wn, bn = np.arange(6.0).reshape(3, 2), np.array([0.5, -0.5])
    W3, b3 = fold.fold_bn_into_following_linear(Wn, bn, gamma, beta, mean, var, eps)
    np.testing.assert_array_equal(W3, Wn * s[:, None])
    np.testing.assert_allclose(b3, bn + t @ Wn, rtol=1e-15)


def test_inputs_are_not_mutated_and_outputs_are_float64_copies():
    _, W, b, gamma, beta, mean, var = _bn_case(2, 5, 4)
    args32 = [a.astype(np.float32) for a in (W, b, gamma, beta, mean, var)]
    before = [a.copy() for a in args32]
    W2, b2 = fold.fold_bn_into_preceding_linear(*args32, 1e-5)
    W3, b3 = fold.fold_bn_into_following_linear(
        args32[0].T.copy(), None, args32[2], args32[3], args32[4], args32[5], 1e-5
    )
    std_mean, std = np.linspace(-1, 1, 5).astype(np.float32), np.full(5, 2.0, np.float32)
    std_before = (std_mean.copy(), std.copy())
    W4, b4 = fold.fold_standardization_into_first_linear(args32[0], args32[1], std_mean, std)
    np.testing.assert_array_equal(std_mean, std_before[0])
    np.testing.assert_array_equal(std, std_before[1])
    for a, a0 in zip(args32, before, strict=True):
        np.testing.assert_array_equal(a, a0)
    for out in (W2, b2, W3, b3, W4, b4):
        assert out.dtype == np.float64
    # gamma == 1, beta == mean == 0, var + eps == 1: the identity BN; result must not alias W.
    n = W.shape[1]
    W5, _ = fold.fold_bn_into_preceding_linear(
        W, None, np.ones(n), np.zeros(n), np.zeros(n), np.ones(n) - 1e-5, 1e-5
    )
    W5[0, 0] = 1e9
    assert W[0, 0] != 1e9


def test_negative_variance_and_shape_mismatch_raise():
    _, W, b, gamma, beta, mean, var = _bn_case(3, 3, 4)
    bad = var.copy()
    bad[1] = -1.0
    with pytest.raises(ValueError, match="var \\+ eps must be positive"):
        fold.fold_bn_into_preceding_linear(W, b, gamma, beta, mean, bad, 1e-5)
    with pytest.raises(ValueError, match="does not match"):
        fold.fold_bn_into_following_linear(W, b, gamma, beta, mean, var, 1e-5)  # BN [4] vs 3 inputs
    with pytest.raises(ValueError, match="std has zero"):
        fold.fold_standardization_into_first_linear(W, b, np.zeros(3), np.array([1.0, 0.0, 2.0]))


def test_compose_affine_is_two_bns_in_a_row():
    rng = np.random.default_rng(4)
    x = rng.normal(0, 1, (5, 3))
    bn1 = (rng.uniform(-2, 2, 3), rng.normal(0, 1, 3), rng.normal(0, 1, 3), rng.uniform(0.1, 2, 3))
    bn2 = (rng.uniform(-2, 2, 3), rng.normal(0, 1, 3), rng.normal(0, 1, 3), rng.uniform(0.1, 2, 3))
    expected = batchnorm_forward_eval(batchnorm_forward_eval(x, *bn1, 1e-5), *bn2, 1e-3)
    s, t = fold.compose_affine(fold.bn_to_affine(*bn1, 1e-5), fold.bn_to_affine(*bn2, 1e-3))
    np.testing.assert_allclose(s * x + t, expected, rtol=1e-12, atol=1e-12)
