"""K folded MLPs of one shape as one network: the ensemble `bnserve convert` writes as one graph.

Every member reads the same input, so the first layers go side by side into one wide layer
(`x @ [W1_0 | W1_1 | ...]`, the members' standardizations already folded into their own columns);
behind it each member keeps its own layers, stacked as `[K, in, out]` arrays, which the export
lays out as block-diagonal Gemm weights or as a batched MatMul over a `[K, batch, width]` tensor
(export.ENSEMBLE_LAYOUTS). The output is the mean of the members' softmax probabilities.

A centred ensemble subtracts one float32 centre from the input for all members (fold_mlp's
`center`): members trained on the same split share their means exactly, and with bagging each
member's own means differ from the centre by a sampling error that goes into its bias in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bnserve.converter import fold
from bnserve.converter.frozen import DenseLayer, FoldedMLP, FrozenMLP

Array = np.ndarray

COMBINE = "mean of the members' softmax probabilities"


@dataclass(frozen=True)
class FusedEnsemble:
    """`x - input_center` (when not None, shared by every member), then the members' layers:
    `layers[0]` is the wide first layer (`W [F, K*out]`, `b [K*out]`), every later one stacked
    per member (`W [K, in, out]`, `b [K, out]`). The activation follows every layer but the last;
    the members' softmax outputs are averaged."""

    layers: tuple[tuple[Array, Array], ...]
    size: int
    activation: str
    leaky_slope: float
    report: dict[str, Any] = field(default_factory=dict)
    input_center: Array | None = None

    @property
    def n_features(self) -> int:
        return int(self.layers[0][0].shape[0])

    @property
    def n_classes(self) -> int:
        W = self.layers[-1][0]
        return int(W.shape[-1] if W.ndim == 3 else W.shape[1] // self.size)

    def member(self, k: int) -> FoldedMLP:
        """Member `k`'s own layers, taken back out of the fused arrays."""
        width = int(self.layers[0][0].shape[1]) // self.size
        W, b = self.layers[0]
        arrays = [(W[:, k * width : (k + 1) * width], b[k * width : (k + 1) * width])]
        arrays += [(W[k], b[k]) for W, b in self.layers[1:]]
        last = len(arrays) - 1
        layers = tuple(
            DenseLayer(
                "output" if i == last else f"hidden.{i}",
                W,
                b,
                None if i == last else self.activation,
            )
            for i, (W, b) in enumerate(arrays)
        )
        return FoldedMLP(layers, self.leaky_slope, self.report, self.input_center)

    def widths(self) -> list[int]:
        """Each member's width after each layer (its hidden widths, then the classes)."""
        first = int(self.layers[0][0].shape[1]) // self.size
        return [first] + [int(W.shape[2]) for W, _ in self.layers[1:]]


def check_same_shape(nets: list[FrozenMLP]) -> None:
    """Members fuse only with the same layer widths and activation (ValueError, naming the
    difference, otherwise)."""
    first = nets[0]

    def shape(net: FrozenMLP) -> tuple[Any, ...]:
        widths = tuple(int(layer.W.shape[1]) for layer in net.hidden)
        return (net.n_features, widths, net.n_classes, net.activation, net.leaky_slope)

    for k, net in enumerate(nets[1:], start=1):
        if shape(net) != shape(first):
            raise ValueError(
                f"member {k} is {_describe(shape(net))}, member 0 {_describe(shape(first))}; "
                "an ensemble graph needs members of one shape"
            )


def _describe(shape: tuple[Any, ...]) -> str:
    features, widths, classes, activation, slope = shape
    layers = "-".join(map(str, (features, *widths, classes)))
    return f"{layers} with {activation}" + (
        f" (slope {slope:g})" if activation == "leaky_relu" else ""
    )


def shared_center(nets: list[FrozenMLP]) -> Array:
    """The one float32 centre of a centred ensemble: the members' mean input means, rounded to
    float32 (exactly each member's own centre when they share their means). ValueError if it
    does not fit in float32."""
    mean = np.mean([np.asarray(n.input_mean, dtype=np.float64) for n in nets], axis=0)
    return fold.split_float32(mean)[0]


def fuse(members: list[FoldedMLP], report: dict[str, Any]) -> FusedEnsemble:
    """The members' folded layers side by side (float64); all must share `input_center`."""
    first = members[0]
    for k, m in enumerate(members[1:], start=1):
        if not _same_center(m.input_center, first.input_center):
            raise ValueError(f"member {k} is centred differently from member 0")
    wide = (
        np.concatenate([m.layers[0].W for m in members], axis=1),
        np.concatenate([m.layers[0].b for m in members]),
    )
    stacked = tuple(
        (
            np.stack([m.layers[i].W for m in members]),
            np.stack([m.layers[i].b for m in members]),
        )
        for i in range(1, len(first.layers))
    )
    return FusedEnsemble(
        layers=(wide, *stacked),
        size=len(members),
        activation=str(first.report["activation"]),
        leaky_slope=first.leaky_slope,
        report=report,
        input_center=first.input_center,
    )


def _same_center(a: Array | None, b: Array | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))


def ensemble_report(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """The fold report of an ensemble from its members' (frozen.fold_report): merged (their BN
    layers and warnings named `member-k/...`), the standardization summed up over the members,
    and `ensemble` (the member count and how outputs combine; the converter adds the layout)."""
    std = [r["standardization"] for r in reports]
    bn_layers = []
    warnings = []
    for k, r in enumerate(reports):
        for rec in r["bn_layers"]:
            into = rec["folded_into"]
            bn_layers.append(
                {
                    **rec,
                    "layer": f"member-{k}/{rec['layer']}",
                    "folded_into": None if into is None else f"member-{k}/{into}",
                }
            )
        warnings += [f"member-{k}: {w}" for w in r["warnings"]]
    return {
        "folded": reports[0]["folded"],
        "placement": reports[0]["placement"],
        "activation": reports[0]["activation"],
        "standardization": {
            "folded_into": std[0]["folded_into"],
            "max_abs_inv_std": max(s["max_abs_inv_std"] for s in std),
            "centred": std[0]["centred"],
            "max_abs_mean_over_std": max(s["max_abs_mean_over_std"] for s in std),
        },
        "bn_layers": bn_layers,
        "warnings": warnings,
        "ensemble": {"members": len(reports), "combine": COMBINE},
    }
