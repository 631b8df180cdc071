"""Folding frozen batch normalization and input standardization into linear layers.

Pure functions on arrays: they compute in float64, never mutate their inputs and return new
arrays. Linear layers use the project's layout, `y = x @ W + b` with `W [in, out]` (ONNX Gemm with
transB=0); a caller holding `W [out, in]` (Gemm transB=1, torch.nn.Linear) transposes first.

With frozen statistics BN is a per-feature affine map `y = s * x + t` with
`s = gamma / sqrt(var + eps)` and `t = beta - s * mean` (docs/folding.md).
Such a map folds into the linear layer before it (scaling its output columns) or into the one
after it (scaling its input rows); it never crosses a nonlinearity, which is why the "after"
placement (linear -> activation -> BN) can only go forward.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "bn_to_affine",
    "compose_affine",
    "fold_affine_into_following_linear",
    "fold_affine_into_preceding_linear",
    "fold_bn_into_following_linear",
    "fold_bn_into_preceding_linear",
    "fold_standardization_into_first_linear",
    "split_float32",
    "standardization_to_affine",
]

Array = np.ndarray


def _f64(name: str, a: Array | float, ndim: int) -> Array:
    # np.array (not asarray) so that the result never aliases the caller's buffer.
    out = np.array(a, dtype=np.float64)
    if out.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {out.shape}")
    return out


def _bias_or_zeros(b: Array | None, width: int) -> Array:
    if b is None:
        return np.zeros(width, dtype=np.float64)
    out = _f64("b", b, 1)
    if out.shape != (width,):
        raise ValueError(f"bias has shape {out.shape}, expected ({width},)")
    return out


def bn_to_affine(
    gamma: Array, beta: Array, mean: Array, var: Array, eps: float
) -> tuple[Array, Array]:
    """Frozen BN as `(s, t)` with `BN(x) = s * x + t`; all inputs `[n]`, outputs float64 `[n]`.

    Works for gamma negative or zero. Raises ValueError when `var + eps` is not positive (a negative
    variance is a corrupt model: the square root would be NaN) or shapes differ.
    """
    gamma, beta = _f64("gamma", gamma, 1), _f64("beta", beta, 1)
    mean, var = _f64("mean", mean, 1), _f64("var", var, 1)
    if not gamma.shape == beta.shape == mean.shape == var.shape:
        raise ValueError(
            f"BN vectors differ in shape: gamma {gamma.shape}, beta {beta.shape}, "
            f"mean {mean.shape}, var {var.shape}"
        )
    denom = var + float(eps)
    if not np.all(denom > 0):
        raise ValueError(f"var + eps must be positive; smallest is {denom.min()!r}")
    s = gamma / np.sqrt(denom)
    return s, beta - s * mean


def standardization_to_affine(mean: Array, std: Array) -> tuple[Array, Array]:
    """`(x - mean) / std` as `(s, t)` = `(1 / std, -mean / std)`; std must be nonzero."""
    mean, std = _f64("mean", mean, 1), _f64("std", std, 1)
    if mean.shape != std.shape:
        raise ValueError(f"mean {mean.shape} and std {std.shape} differ in shape")
    if not np.all(std != 0):
        raise ValueError("std has zero entries (a constant feature must be stored with std 1)")
    return 1.0 / std, -mean / std


def compose_affine(first: tuple[Array, Array], second: tuple[Array, Array]) -> tuple[Array, Array]:
    """The per-feature affine map `second(first(x))` (e.g. two BatchNormalization nodes in a row)."""
    s1, t1 = (_f64("s", a, 1) for a in first)
    s2, t2 = (_f64("s", a, 1) for a in second)
    return s2 * s1, s2 * t1 + t2


def fold_affine_into_preceding_linear(
    W: Array, b: Array | None, s: Array, t: Array
) -> tuple[Array, Array]:
    """`s * (x @ W + b) + t` as one layer: `(W * s[None, :], s * b + t)`. `W [in, out]`, `s, t [out]`."""
    W = _f64("W", W, 2)
    s, t = _f64("s", s, 1), _f64("t", t, 1)
    if s.shape != (W.shape[1],) or t.shape != s.shape:
        raise ValueError(f"affine of size {s.shape} does not match the {W.shape[1]} outputs of W")
    b = _bias_or_zeros(b, W.shape[1])
    return W * s[None, :], s * b + t


def fold_affine_into_following_linear(
    W_next: Array, b_next: Array | None, s: Array, t: Array
) -> tuple[Array, Array]:
    """`(s * x + t) @ W_next + b_next` as one layer: `(s[:, None] * W_next, b_next + t @ W_next)`.

    `W_next [in, out]` with `s, t [in]`: the affine scales the rows (input features) of W_next.
    """
    W_next = _f64("W_next", W_next, 2)
    s, t = _f64("s", s, 1), _f64("t", t, 1)
    if s.shape != (W_next.shape[0],) or t.shape != s.shape:
        raise ValueError(
            f"affine of size {s.shape} does not match the {W_next.shape[0]} inputs of W"
        )
    b_next = _bias_or_zeros(b_next, W_next.shape[1])
    return s[:, None] * W_next, b_next + t @ W_next


def fold_bn_into_preceding_linear(
    W: Array, b: Array | None, gamma: Array, beta: Array, mean: Array, var: Array, eps: float
) -> tuple[Array, Array]:
    """BN "before" the activation: `BN(x @ W + b)` -> `x @ W' + b'` (float64).

    `W' = W * s` (per output column), `b' = s * (b - mean) + beta`; `b` None means no bias (the
    usual case: BN's beta replaces it). `W [in, out]`; the BN vectors are `[out]`.
    """
    s, t = bn_to_affine(gamma, beta, mean, var, eps)
    return fold_affine_into_preceding_linear(W, b, s, t)


def fold_bn_into_following_linear(
    W_next: Array,
    b_next: Array | None,
    gamma: Array,
    beta: Array,
    mean: Array,
    var: Array,
    eps: float,
) -> tuple[Array, Array]:
    """BN "after" the activation: `BN(a) @ W_next + b_next` -> `a @ W' + b'` (float64).

    `W' = W_next * s` (per input row), `b' = b_next + t @ W_next` with `t = beta - s * mean`.
    `W_next [in, out]`; the BN vectors are `[in]`.
    """
    s, t = bn_to_affine(gamma, beta, mean, var, eps)
    return fold_affine_into_following_linear(W_next, b_next, s, t)


def fold_standardization_into_first_linear(
    W: Array, b: Array | None, mean: Array, std: Array
) -> tuple[Array, Array]:
    """`((x - mean) / std) @ W + b` -> `x @ W' + b'` with `W' = W / std` (rows) and
    `b' = b - (mean / std) @ W` (float64). `W [in, out]`, `mean, std [in]`.
    """
    s, t = standardization_to_affine(mean, std)
    return fold_affine_into_following_linear(W, b, s, t)


def split_float32(a: Array) -> tuple[Array, Array]:
    """`a` (float64) as `hi + lo`: `hi` exactly representable in float32 (`a` rounded to it), `lo`
    the float64 remainder (at most 2**-24 of `|a|`). A float32 graph that subtracts `hi` from its
    input loses nothing to the constant's rounding when `lo` is folded elsewhere in float64."""
    a = _f64("a", a, 1)
    with np.errstate(over="ignore"):
        hi = a.astype(np.float32).astype(np.float64)
    if not np.all(np.isfinite(hi)):
        raise ValueError(f"values do not fit in float32 (max |value| {np.max(np.abs(a)):.3g})")
    return hi, a - hi
