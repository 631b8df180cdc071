"""Checkpoint -> `FrozenMLP`: choose the statistics, check every array, cast to float64.

This is where a corrupt model is refused (CheckpointError, exit code 2) before anything is
written: NaN or inf in any weight or statistic, a negative variance, a non-positive input std.
Training-mode behaviour cannot reach the export: only the chosen frozen statistics are copied.
"""

from __future__ import annotations

import numpy as np

from bnserve.converter.frozen import FrozenBN, FrozenLayer, FrozenMLP
from bnserve.errors import CheckpointError
from bnserve.models.checkpoint import Checkpoint


def _checked(params: dict[str, np.ndarray], name: str) -> np.ndarray:
    a = np.array(params[name], dtype=np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        kinds = sorted({"NaN" if np.isnan(v) else "inf" for v in a[bad]})
        raise CheckpointError(
            f"array {name!r} has {int(bad.sum())} non-finite value(s) ({', '.join(kinds)}): "
            "a corrupt model; refusing to convert"
        )
    return a


def validate_params(ckpt: Checkpoint) -> None:
    """Refuse NaN/inf anywhere, negative variances, non-positive std (all statistics, not only the
    chosen ones: either means the file is corrupt)."""
    for name in sorted(ckpt.params):
        a = _checked(ckpt.params, name)
        if name.endswith("_var") and (a < 0).any():
            raise CheckpointError(
                f"array {name!r} has {int((a < 0).sum())} negative variance(s) (min {a.min():.6g}): "
                "a corrupt model; refusing to convert"
            )
        if name == "input.std" and (a <= 0).any():
            raise CheckpointError(
                f"array 'input.std' has {int((a <= 0).sum())} entries <= 0 (min {a.min():.6g}); "
                "expected positive (constant features are stored with std 1)"
            )


def freeze_checkpoint(ckpt: Checkpoint, stats: str | None = None) -> tuple[FrozenMLP, str]:
    """Return the frozen float64 network and the name of the statistics used."""
    chosen = ckpt.resolve_stats(stats)
    validate_params(ckpt)
    p, spec = ckpt.params, ckpt.spec
    hidden = []
    for i in range(len(spec.hidden)):
        pre = f"hidden.{i}."
        bn = None
        if spec.has_bn:
            bn = FrozenBN(
                gamma=_checked(p, pre + "gamma"),
                beta=_checked(p, pre + "beta"),
                mean=_checked(p, pre + f"{chosen}_mean"),
                var=_checked(p, pre + f"{chosen}_var"),
                eps=float(spec.bn_eps),
            )
        b = _checked(p, pre + "b") if pre + "b" in p else None
        hidden.append(FrozenLayer(W=_checked(p, pre + "W"), b=b, bn=bn))
    net = FrozenMLP(
        input_mean=_checked(p, "input.mean"),
        input_std=_checked(p, "input.std"),
        hidden=tuple(hidden),
        placement=spec.bn,
        activation=spec.activation,
        leaky_slope=float(spec.leaky_slope),
        output_W=_checked(p, "output.W"),
        output_b=_checked(p, "output.b"),
    )
    return net, chosen
