"""Every backward pass against central-difference numerical gradients (float64)."""

from __future__ import annotations

import numpy as np
import pytest

from bnserve.models import layers
from bnserve.models.network import NetworkSpec, init_params, loss_and_grads, trainable_names

H = 1e-6
TOLERANCE = 1e-6


def rel_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    """||a - n|| / (||a|| + ||n||): the usual gradient-check measure, scale-free."""
    denom = np.linalg.norm(analytic) + np.linalg.norm(numeric)
    return float(np.linalg.norm(analytic - numeric) / max(denom, 1e-300))


def numeric_grad(f, x: np.ndarray) -> np.ndarray:
    """d f() / d x by central differences; `f` reads `x` (which is perturbed in place)."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + H
        plus = f()
        x[i] = old - H
        minus = f()
        x[i] = old
        grad[i] = (plus - minus) / (2 * H)
    return grad


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def check_layer(forward, backward_inputs, inputs: list[np.ndarray], dout: np.ndarray) -> None:
    """Checks d(sum(forward() * dout)) / d input for every array in `inputs`."""
    analytic = backward_inputs()
    for x, a in zip(inputs, analytic, strict=True):
        n = numeric_grad(lambda: float(np.sum(forward() * dout)), x)
        assert rel_error(a, n) < TOLERANCE, f"relative error {rel_error(a, n):.2e}"


def test_linear_backward(rng):
    x, W, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3)), rng.standard_normal(3)
    dout = rng.standard_normal((5, 3))
    check_layer(
        lambda: layers.linear_forward(x, W, b)[0],
        lambda: layers.linear_backward(dout, x, W),
        [x, W, b],
        dout,
    )


@pytest.mark.parametrize("gamma_sign", [1.0, -1.0])
def test_batchnorm_backward(rng, gamma_sign):
    x = rng.standard_normal((6, 4)) * 3 + 2
    gamma = gamma_sign * (rng.random(4) + 0.5)
    beta = rng.standard_normal(4)
    dout = rng.standard_normal((6, 4))

    def forward():
        return layers.batchnorm_forward_train(x, gamma, beta, 1e-5)[0]

    def backward():
        _, cache, _, _ = layers.batchnorm_forward_train(x, gamma, beta, 1e-5)
        return layers.batchnorm_backward(dout, cache)

    check_layer(forward, backward, [x, gamma, beta], dout)


def test_batchnorm_refuses_one_example():
    with pytest.raises(ValueError, match="at least 2"):
        layers.batchnorm_forward_train(np.ones((1, 3)), np.ones(3), np.zeros(3), 1e-5)


@pytest.mark.parametrize("kind", layers.ACTIVATIONS)
def test_activation_backward(rng, kind):
    # keep inputs away from ReLU's kink so central differences are valid
    x = rng.standard_normal((5, 4))
    x[np.abs(x) < 1e-3] = 0.5
    dout = rng.standard_normal((5, 4))
    check_layer(
        lambda: layers.activation_forward(x, kind, 0.1)[0],
        lambda: [
            layers.activation_backward(dout, layers.activation_forward(x, kind, 0.1)[1], kind)
        ],
        [x],
        dout,
    )


def test_dropout_backward_with_fixed_mask(rng):
    x, dout = rng.standard_normal((5, 4)), rng.standard_normal((5, 4))
    mask = layers.dropout_mask(x.shape, 0.3, rng, np.float64)
    assert set(np.unique(mask)) <= {0.0, 1 / 0.7}
    check_layer(
        lambda: layers.dropout_forward(x, mask),
        lambda: [layers.dropout_backward(dout, mask)],
        [x],
        dout,
    )


def test_softmax_cross_entropy_gradient_and_stability(rng):
    logits, y = rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    _, dlogits = layers.softmax_cross_entropy(logits, y)
    n = numeric_grad(lambda: layers.softmax_cross_entropy(logits, y)[0], logits)
    assert rel_error(dlogits, n) < TOLERANCE
    # huge logits must not overflow: log-softmax subtracts the max
    loss, grad = layers.softmax_cross_entropy(
        np.array([[1000.0, 0.0], [0.0, -1000.0]]), np.array([1, 1])
    )
    assert np.isfinite(loss) and np.isfinite(grad).all()
    assert loss == pytest.approx(1000.0 / 2 + 1000.0 / 2)


@pytest.mark.parametrize("bn", ["before", "after", "none"])
@pytest.mark.parametrize("activation", layers.ACTIVATIONS)
def test_whole_network_gradients(rng, bn, activation):
    spec = NetworkSpec(
        n_features=4, n_classes=3, hidden=(5, 4), activation=activation, bn=bn, dropout=0.25
    )
    params = init_params(spec, rng)
    for name in params:  # non-trivial gamma/beta/biases so every term of the backward matters
        if name.endswith((".gamma", ".beta", ".b")):
            params[name] = params[name] + rng.standard_normal(params[name].shape) * 0.5
    X, y = rng.standard_normal((7, 4)), rng.integers(0, 3, 7)
    masks = [layers.dropout_mask((7, w), 0.25, rng, np.float64) for w in spec.hidden]

    def loss() -> float:
        return loss_and_grads(spec, params, X, y, dropout_masks=masks, update_running=False)[0]

    _, grads, _ = loss_and_grads(spec, params, X, y, dropout_masks=masks, update_running=False)
    assert sorted(grads) == sorted(trainable_names(params))
    if bn == "before":
        assert "hidden.0.b" not in params  # BN's beta replaces the bias
    for name, analytic in grads.items():
        numeric = numeric_grad(loss, params[name])
        assert rel_error(analytic, numeric) < TOLERANCE, (
            f"{name}: {rel_error(analytic, numeric):.2e}"
        )
