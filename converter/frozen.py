"""The converter's own description of an MLP with frozen statistics, and its folding.

`FrozenMLP` is what the checkpoint becomes once the statistics are chosen (float64, validated);
`fold_mlp` turns it into a `FoldedMLP`: only dense layers, activations and softmax (optionally
behind one subtraction of the input means), plus the fold report that goes into the ONNX
metadata. Nothing here reads files or knows the checkpoint format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnserve.converter import fold
from bnserve.models.layers import activation_eval, softmax

Array = np.ndarray

# Above this |s| float32 loses enough of the folded weights' precision to be worth a warning:
# the tiny variance is then magnified into the weights (docs/folding.md).
LARGE_SCALE = 1e4


@dataclass(frozen=True)
class FrozenBN:
    """BN in inference mode: all vectors `[width]`, float64."""

    gamma: Array
    beta: Array
    mean: Array
    var: Array
    eps: float

    def affine(self) -> tuple[Array, Array]:
        return fold.bn_to_affine(self.gamma, self.beta, self.mean, self.var, self.eps)


@dataclass(frozen=True)
class FrozenLayer:
    """One hidden layer: `x @ W + b` (`W [in, out]`, b None without bias), then BN and activation
    in the order the network's placement says."""

    W: Array
    b: Array | None
    bn: FrozenBN | None


@dataclass(frozen=True)
class FrozenMLP:
    """standardize -> hidden layers -> output linear -> softmax, with frozen statistics."""

    input_mean: Array
    input_std: Array
    hidden: tuple[FrozenLayer, ...]
    placement: str  # "before" | "after" | "none"
    activation: str  # "relu" | "leaky_relu" | "tanh" | "sigmoid"
    leaky_slope: float
    output_W: Array
    output_b: Array

    @property
    def n_features(self) -> int:
        return int(self.input_mean.shape[0])

    @property
    def n_classes(self) -> int:
        return int(self.output_b.shape[0])


@dataclass(frozen=True)
class DenseLayer:
    """`x @ W + b`, then `activation` (None for the output layer). float64 until export."""

    name: str
    W: Array
    b: Array
    activation: str | None


@dataclass(frozen=True)
class FoldedMLP:
    """`x - input_center` (when not None: per-feature constants, exactly representable in float32),
    then the dense layers."""

    layers: tuple[DenseLayer, ...]
    leaky_slope: float
    report: dict[str, Any] = field(default_factory=dict)
    input_center: Array | None = None


def bn_record(layer: str, placement: str, bn: FrozenBN, folded_into: str | None) -> dict[str, Any]:
    """One BN layer's entry in the fold report (also used for the unfolded export)."""
    s, _ = bn.affine()
    max_abs_s = float(np.max(np.abs(s))) if s.size else 0.0
    if folded_into is None:
        direction = "kept as BatchNormalization"
    elif placement == "before":
        direction = "into preceding linear"
    else:
        direction = "into following linear"
    return {
        "layer": layer,
        "placement": placement,
        "direction": direction,
        "folded_into": folded_into,
        "eps": float(bn.eps),
        "min_var": float(np.min(bn.var)),
        "max_abs_s": max_abs_s,
        "large_scale": bool(max_abs_s > LARGE_SCALE),
    }


def fold_mlp(net: FrozenMLP, *, centred: bool = False, center: Array | None = None) -> FoldedMLP:
    """Fold the standardization and every BN into the dense layers (float64 throughout).

    "before": BN folds into its own (preceding) linear layer. "after": BN sits behind the
    activation, so it folds into the next linear layer (the next hidden layer's, or the output
    layer's for the last one). The standardization folds into the first linear layer.

    `centred`: keep the centring as `x - c` in front of the first layer, `c` the input means
    rounded to float32, and fold only the scale 1/std (and the means' float32 rounding remainder,
    at most 2**-24 of them) into the first layer. A float32 graph then subtracts the means while
    the input is still exact, instead of cancelling a large `x @ W'` against a large bias `b'`
    (docs/folding.md). ValueError if a mean does not fit in float32.

    `center` (with `centred`): the float32 values to subtract instead of this network's own means
    rounded to float32 (an ensemble subtracts one centre for all its members: each member's own
    means minus that centre fold into its first bias in float64).
    """
    n = len(net.hidden)
    names = [f"hidden.{i}" for i in range(n)] + ["output"]
    Ws: list[Array] = [np.array(layer.W, dtype=np.float64) for layer in net.hidden]
    bs: list[Array | None] = [
        None if layer.b is None else np.array(layer.b, dtype=np.float64) for layer in net.hidden
    ]
    Ws.append(np.array(net.output_W, dtype=np.float64))
    bs.append(np.array(net.output_b, dtype=np.float64))

    records: list[dict[str, Any]] = []
    for i, layer in enumerate(net.hidden):
        if layer.bn is None:
            continue
        if net.placement == "before":
            Ws[i], bs[i] = fold.fold_bn_into_preceding_linear(
                Ws[i],
                bs[i],
                layer.bn.gamma,
                layer.bn.beta,
                layer.bn.mean,
                layer.bn.var,
                layer.bn.eps,
            )
            records.append(bn_record(names[i], "before", layer.bn, names[i]))
        else:
            Ws[i + 1], bs[i + 1] = fold.fold_bn_into_following_linear(
                Ws[i + 1],
                bs[i + 1],
                layer.bn.gamma,
                layer.bn.beta,
                layer.bn.mean,
                layer.bn.var,
                layer.bn.eps,
            )
            records.append(bn_record(names[i], "after", layer.bn, names[i + 1]))

    # The standardization acts on the raw input, i.e. before the first layer's W, whatever the
    # BN placement: W0 (with BN "before" already folded into its columns) gets its rows scaled.
    folded_mean = net.input_mean
    if centred and center is None:
        center, folded_mean = fold.split_float32(net.input_mean)
    elif centred:
        center = np.array(center, dtype=np.float64)
        folded_mean = net.input_mean - center
    else:
        center = None
    Ws[0], bs[0] = fold.fold_standardization_into_first_linear(
        Ws[0], bs[0], folded_mean, net.input_std
    )
    layers = tuple(
        DenseLayer(
            name=names[i],
            W=Ws[i],
            b=fold._bias_or_zeros(bs[i], Ws[i].shape[1]),
            activation=net.activation if i < n else None,
        )
        for i in range(n + 1)
    )
    report = fold_report(net, records, folded=True, centred=centred)
    return FoldedMLP(layers=layers, leaky_slope=net.leaky_slope, report=report, input_center=center)


def fold_report(
    net: FrozenMLP, records: list[dict[str, Any]], folded: bool, centred: bool = False
) -> dict[str, Any]:
    """The `bnserve.fold_report` metadata: per BN layer direction, min variance and max |s|; for
    the standardization, where it went, whether the input is kept centred, and how far the means
    sit from zero in standard deviations (the float32 cancellation a full fold risks)."""
    inv_std = 1.0 / np.asarray(net.input_std, dtype=np.float64)
    mean_over_std = np.abs(np.asarray(net.input_mean, dtype=np.float64)) * inv_std
    warnings = [
        f"{r['layer']}: max |s| = {r['max_abs_s']:.3g} > {LARGE_SCALE:.0e} "
        f"(min var {r['min_var']:.3g}, eps {r['eps']:.3g}): float32 precision loss is possible"
        for r in records
        if r["large_scale"]
    ]
    return {
        "folded": folded,
        "placement": net.placement,
        "activation": net.activation,
        "standardization": {
            "folded_into": ("hidden.0" if net.hidden else "output") if folded else None,
            "max_abs_inv_std": float(np.max(np.abs(inv_std))),
            "centred": bool(folded and centred),
            "max_abs_mean_over_std": float(np.max(mean_over_std, initial=0.0)),
        },
        "bn_layers": records,
        "warnings": warnings,
    }


def unfolded_report(net: FrozenMLP) -> dict[str, Any]:
    records = [
        bn_record(f"hidden.{i}", net.placement, layer.bn, None)
        for i, layer in enumerate(net.hidden)
        if layer.bn is not None
    ]
    return fold_report(net, records, folded=False)


def folded_logits(
    folded: FoldedMLP,
    X: Array,
    dtype: Any = np.float64,
    matmul: Callable[[Array, Array], Array] = np.matmul,
) -> Array:
    """Evaluate the folded network (the input centring, when kept, then the layers) in numpy in
    `dtype`, up to the logits (returned as float64).

    In float64 this checks the fold arithmetic itself; in float32, with different `matmul`
    summation orders, it gives independent samples of float32's own rounding error for these
    weights (the parity gate's noise floor).
    """
    a = np.asarray(X).astype(dtype)
    if folded.input_center is not None:
        a = a - folded.input_center.astype(dtype)
    for layer in folded.layers:
        a = matmul(a, layer.W.astype(dtype)) + layer.b.astype(dtype)
        if layer.activation is not None:
            a = activation_eval(a, layer.activation, dtype(folded.leaky_slope))
    return a.astype(np.float64)


def folded_probabilities(
    folded: FoldedMLP,
    X: Array,
    dtype: Any = np.float64,
    matmul: Callable[[Array, Array], Array] = np.matmul,
) -> Array:
    """`folded_logits` followed by softmax in float64."""
    return softmax(folded_logits(folded, X, dtype, matmul))
