"""Layers as pure forward/backward pairs (CS231n style).

Every `*_forward` returns `(out, cache)`; the matching `*_backward(dout, cache)` returns the gradient
with respect to the input (and the parameters, where the layer has any). Shapes: `x` is
`[batch, features]`; linear weights are stored as `W [in, out]` so that a layer is `x @ W + b`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = np.ndarray

ACTIVATIONS = ("relu", "leaky_relu", "tanh", "sigmoid")


# --- linear -------------------------------------------------------------------------------------


def linear_forward(x: Array, W: Array, b: Array | None) -> tuple[Array, Array]:
    """`x [m, in] @ W [in, out] (+ b [out])`; the cache is the input."""
    out = x @ W
    if b is not None:
        out += b
    return out, x


def linear_backward(dout: Array, x: Array, W: Array) -> tuple[Array, Array, Array]:
    """Returns `(dx [m, in], dW [in, out], db [out])`."""
    return dout @ W.T, x.T @ dout, dout.sum(axis=0)


# --- batch normalization ------------------------------------------------------------------------


def batchnorm_forward_train(
    x: Array, gamma: Array, beta: Array, eps: float
) -> tuple[Array, tuple[Array, Array, Array], Array, Array]:
    """Training mode: normalize with the batch mean and the biased batch variance.

    Returns `(out, cache, batch_mean, batch_var_biased)`; the caller updates running statistics.
    """
    m = x.shape[0]
    if m < 2:
        # One example has no variance: BN would output beta whatever the input, with zero gradient.
        raise ValueError("batch normalization in training mode needs at least 2 examples per batch")
    mean = x.mean(axis=0)
    centered = x - mean
    var = np.einsum("ij,ij->j", centered, centered) / m
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = centered
    xhat *= inv_std  # reuse the buffer: `centered` is not needed any more
    out = xhat * gamma + beta
    return out, (xhat, inv_std, gamma), mean, var


def batchnorm_forward_eval(
    x: Array, gamma: Array, beta: Array, mean: Array, var: Array, eps: float
) -> Array:
    """Inference mode: the frozen statistics make BN an affine map per feature."""
    scale = gamma / np.sqrt(var + eps)
    return x * scale + (beta - mean * scale)


def batchnorm_backward(
    dout: Array, cache: tuple[Array, Array, Array]
) -> tuple[Array, Array, Array]:
    """The fused BN backward: returns `(dx, dgamma, dbeta)`.

    dx = inv_std / m * (m * dxhat - sum(dxhat) - xhat * sum(dxhat * xhat)), dxhat = dout * gamma,
    rewritten with dgamma and dbeta so that only two reductions over the batch are needed.
    """
    xhat, inv_std, gamma = cache
    m = dout.shape[0]
    dbeta = dout.sum(axis=0)
    dgamma = np.einsum("ij,ij->j", dout, xhat)
    # sum(dxhat) = gamma * dbeta and sum(dxhat * xhat) = gamma * dgamma
    dx = xhat * (dgamma / m)
    dx -= dout
    dx += dbeta / m
    dx *= -(gamma * inv_std)
    return dx, dgamma, dbeta


# --- activations --------------------------------------------------------------------------------


def activation_forward(x: Array, kind: str, leaky_slope: float = 0.01) -> tuple[Array, Any]:
    """Apply the activation `kind`; the cache is whatever its backward needs."""
    if kind == "relu":
        out = np.maximum(x, 0)
        return out, out
    if kind == "leaky_relu":
        positive = x > 0
        return np.where(positive, x, x * leaky_slope), (positive, leaky_slope)
    if kind == "tanh":
        out = np.tanh(x)
        return out, out
    if kind == "sigmoid":
        out = sigmoid(x)
        return out, out
    raise ValueError(f"unknown activation {kind!r}; expected one of {', '.join(ACTIVATIONS)}")


def activation_backward(dout: Array, cache: Any, kind: str) -> Array:
    if kind == "relu":
        return dout * (cache > 0)
    if kind == "leaky_relu":
        positive, slope = cache
        return np.where(positive, dout, dout * slope)
    if kind == "tanh":
        return dout * (1 - cache * cache)
    if kind == "sigmoid":
        return dout * cache * (1 - cache)
    raise ValueError(f"unknown activation {kind!r}")


def activation_eval(x: Array, kind: str, leaky_slope: float = 0.01) -> Array:
    return activation_forward(x, kind, leaky_slope)[0]


def sigmoid(x: Array) -> Array:
    """A sigmoid that never overflows: exp only ever sees non-positive arguments."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


# --- dropout ------------------------------------------------------------------------------------


def dropout_mask(shape: tuple[int, ...], p: float, rng: np.random.Generator, dtype: Any) -> Array:
    """Inverted dropout: keep with probability 1-p and scale by 1/(1-p), so eval needs no change."""
    keep = 1.0 - p
    return (rng.random(shape) < keep).astype(dtype) / dtype(keep)


def dropout_forward(x: Array, mask: Array) -> Array:
    return x * mask


def dropout_backward(dout: Array, mask: Array) -> Array:
    return dout * mask


# --- softmax and cross-entropy ------------------------------------------------------------------


def log_softmax(z: Array) -> Array:
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(z: Array) -> Array:
    shifted = z - z.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def softmax_cross_entropy(logits: Array, y: Array) -> tuple[float, Array]:
    """Mean cross-entropy of integer labels `y` and its gradient `(softmax - onehot) / m`."""
    m = logits.shape[0]
    logp = log_softmax(logits)
    loss = -float(logp[np.arange(m), y].mean())
    dlogits = np.exp(logp)
    dlogits[np.arange(m), y] -= 1
    dlogits /= m
    return loss, dlogits
