"""The BN MLP: a spec, its parameters as a flat dict of arrays, and forward/backward passes.

Parameter names (the checkpoint stores them under the same names):

    hidden.{i}.W [in, out]     hidden.{i}.b [out]   (absent with BN "before": beta replaces it)
    hidden.{i}.gamma, .beta    hidden.{i}.running_mean, .running_var
                               hidden.{i}.population_mean, .population_var   (only when computed)
    output.W [in, C], output.b [C]
    input.mean [F], input.std [F]   (standardization, applied inside the model)

Layer order per hidden layer, by placement:
    before: linear (no bias) -> BN -> activation -> dropout
    after:  linear (bias)    -> activation -> BN -> dropout
    none:   linear (bias)    -> activation -> dropout
then the output layer: linear (bias) -> softmax.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bnserve.models import layers

Array = np.ndarray
Params = dict[str, Array]

PLACEMENTS = ("before", "after", "none")
TRAINABLE_SUFFIXES = (".W", ".b", ".gamma", ".beta")


@dataclass(frozen=True)
class NetworkSpec:
    """Architecture of the MLP: everything needed to rebuild it from its parameters."""

    n_features: int
    n_classes: int
    hidden: tuple[int, ...] = (100, 100, 100)
    activation: str = "relu"
    bn: str = "before"
    dropout: float = 0.0
    leaky_slope: float = 0.01
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1  # PyTorch's convention: the weight of the new batch

    def __post_init__(self) -> None:
        if self.activation not in layers.ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; expected {', '.join(layers.ACTIVATIONS)}"
            )
        if self.bn not in PLACEMENTS:
            raise ValueError(f"unknown BN placement {self.bn!r}; expected {', '.join(PLACEMENTS)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 < self.bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        if self.bn_eps <= 0:
            raise ValueError(f"bn_eps must be positive, got {self.bn_eps}")
        if any(w < 1 for w in self.hidden) or self.n_features < 1 or self.n_classes < 2:
            raise ValueError("layer widths must be >= 1 and there must be at least 2 classes")

    @property
    def has_bn(self) -> bool:
        return self.bn != "none"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> NetworkSpec:
        d = dict(d)
        d["hidden"] = tuple(int(w) for w in d["hidden"])
        return cls(**d)


def expected_shapes(spec: NetworkSpec) -> dict[str, tuple[int, ...]]:
    """The name and shape of every required array of a network with this spec."""
    shapes: dict[str, tuple[int, ...]] = {
        "input.mean": (spec.n_features,),
        "input.std": (spec.n_features,),
    }
    fan_in = spec.n_features
    for i, width in enumerate(spec.hidden):
        shapes[f"hidden.{i}.W"] = (fan_in, width)
        if spec.bn != "before":
            shapes[f"hidden.{i}.b"] = (width,)
        if spec.has_bn:
            for name in ("gamma", "beta", "running_mean", "running_var"):
                shapes[f"hidden.{i}.{name}"] = (width,)
        fan_in = width
    shapes["output.W"] = (fan_in, spec.n_classes)
    shapes["output.b"] = (spec.n_classes,)
    return shapes


def init_params(spec: NetworkSpec, rng: np.random.Generator, dtype: Any = np.float64) -> Params:
    """He initialization for the ReLU family, Xavier/Glorot for tanh and sigmoid; gamma 1, beta 0."""
    params: Params = {}
    relu_family = spec.activation in ("relu", "leaky_relu")
    for name, shape in expected_shapes(spec).items():
        if name.endswith(".W"):
            fan_in, fan_out = shape
            is_output = name.startswith("output.")
            # The output layer feeds softmax, not the activation: Glorot suits it either way.
            if relu_family and not is_output:
                std = np.sqrt(2.0 / fan_in)
            else:
                std = np.sqrt(2.0 / (fan_in + fan_out))
            params[name] = (rng.standard_normal(shape) * std).astype(dtype)
        elif name.endswith((".gamma", ".running_var", "input.std")):
            params[name] = np.ones(shape, dtype=dtype)
        else:
            params[name] = np.zeros(shape, dtype=dtype)
    return params


def trainable_names(params: Params) -> list[str]:
    return [n for n in params if n.endswith(TRAINABLE_SUFFIXES)]


def standardize(X: Array, params: Params) -> Array:
    return (X - params["input.mean"]) / params["input.std"]


def _bn_stats(params: Params, i: int, stats: str) -> tuple[Array, Array]:
    key = f"hidden.{i}.{stats}_mean"
    if key not in params:
        raise KeyError(f"this network has no {stats} statistics")
    return params[key], params[f"hidden.{i}.{stats}_var"]


def hidden_forward_eval(
    spec: NetworkSpec, params: Params, a: Array, i: int, stats: str = "running"
) -> Array:
    """Hidden layer `i` in inference mode, from its (standardized) input to its output."""
    W, b = params[f"hidden.{i}.W"], params.get(f"hidden.{i}.b")
    z, _ = layers.linear_forward(a, W, b)
    gamma, beta = params.get(f"hidden.{i}.gamma"), params.get(f"hidden.{i}.beta")
    if spec.bn == "before":
        z = layers.batchnorm_forward_eval(z, gamma, beta, *_bn_stats(params, i, stats), spec.bn_eps)
    a = layers.activation_eval(z, spec.activation, spec.leaky_slope)
    if spec.bn == "after":
        a = layers.batchnorm_forward_eval(a, gamma, beta, *_bn_stats(params, i, stats), spec.bn_eps)
    return a


def logits_eval(spec: NetworkSpec, params: Params, X: Array, stats: str = "running") -> Array:
    """Inference-mode logits from raw (unstandardized) features, in the dtype of the params."""
    a = standardize(np.asarray(X, dtype=params["output.W"].dtype), params)
    for i in range(len(spec.hidden)):
        a = hidden_forward_eval(spec, params, a, i, stats)
    return layers.linear_forward(a, params["output.W"], params["output.b"])[0]


def predict_proba(spec: NetworkSpec, params: Params, X: Array, stats: str = "running") -> Array:
    """Inference-mode class probabilities from raw features (the reference the converter checks)."""
    return layers.softmax(logits_eval(spec, params, X, stats))


@dataclass
class ForwardCache:
    """What one training-mode forward pass leaves for the backward pass."""

    per_layer: list[dict[str, Any]] = field(default_factory=list)
    last_input: Array | None = None


def forward_train(
    spec: NetworkSpec,
    params: Params,
    a: Array,
    rng: np.random.Generator | None = None,
    dropout_masks: list[Array] | None = None,
    update_running: bool = True,
) -> tuple[Array, ForwardCache]:
    """Training-mode forward from standardized input: batch statistics, dropout, running averages.

    `dropout_masks` fixes the dropout masks (for gradient checks); otherwise they are drawn from `rng`.
    """
    cache = ForwardCache()
    momentum = spec.bn_momentum
    for i in range(len(spec.hidden)):
        layer: dict[str, Any] = {}
        p = f"hidden.{i}."
        z, layer["linear"] = layers.linear_forward(a, params[p + "W"], params.get(p + "b"))
        if spec.bn == "before":
            z, layer["bn"], mu, var = layers.batchnorm_forward_train(
                z, params[p + "gamma"], params[p + "beta"], spec.bn_eps
            )
        a, layer["act"] = layers.activation_forward(z, spec.activation, spec.leaky_slope)
        if spec.bn == "after":
            a, layer["bn"], mu, var = layers.batchnorm_forward_train(
                a, params[p + "gamma"], params[p + "beta"], spec.bn_eps
            )
        if spec.has_bn and update_running:
            m = a.shape[0]
            # running_var tracks the unbiased variance, as PyTorch does.
            rm, rv = params[p + "running_mean"], params[p + "running_var"]
            rm *= 1 - momentum
            rm += momentum * mu
            rv *= 1 - momentum
            rv += (momentum * m / (m - 1)) * var
        if spec.dropout > 0:
            if dropout_masks is not None:
                mask = dropout_masks[i]
            else:
                if rng is None:
                    raise ValueError("dropout needs an rng or fixed masks")
                mask = layers.dropout_mask(a.shape, spec.dropout, rng, a.dtype.type)
            a = layers.dropout_forward(a, mask)
            layer["dropout"] = mask
        cache.per_layer.append(layer)
    logits, cache.last_input = layers.linear_forward(a, params["output.W"], params["output.b"])
    return logits, cache


def backward(spec: NetworkSpec, params: Params, dlogits: Array, cache: ForwardCache) -> Params:
    """Gradients of the loss with respect to every trainable parameter, given dL/dlogits."""
    grads: Params = {}
    da, grads["output.W"], grads["output.b"] = layers.linear_backward(
        dlogits, cache.last_input, params["output.W"]
    )
    for i in reversed(range(len(spec.hidden))):
        layer = cache.per_layer[i]
        p = f"hidden.{i}."
        if "dropout" in layer:
            da = layers.dropout_backward(da, layer["dropout"])
        if spec.bn == "after":
            da, grads[p + "gamma"], grads[p + "beta"] = layers.batchnorm_backward(da, layer["bn"])
        dz = layers.activation_backward(da, layer["act"], spec.activation)
        if spec.bn == "before":
            dz, grads[p + "gamma"], grads[p + "beta"] = layers.batchnorm_backward(dz, layer["bn"])
        W = params[p + "W"]
        if i > 0:
            da, grads[p + "W"], db = layers.linear_backward(dz, layer["linear"], W)
        else:  # the input needs no gradient: skip that matrix product
            grads[p + "W"] = layer["linear"].T @ dz
            db = dz.sum(axis=0)
        if p + "b" in params:
            grads[p + "b"] = db
    return grads


def loss_and_grads(
    spec: NetworkSpec,
    params: Params,
    a: Array,
    y: Array,
    rng: np.random.Generator | None = None,
    dropout_masks: list[Array] | None = None,
    update_running: bool = True,
) -> tuple[float, Params, Array]:
    """One training-mode forward and backward: `(loss, grads, logits)`."""
    logits, cache = forward_train(spec, params, a, rng, dropout_masks, update_running)
    loss, dlogits = layers.softmax_cross_entropy(logits, y)
    return loss, backward(spec, params, dlogits, cache), logits
