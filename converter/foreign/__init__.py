"""Find and fold batch normalization in ONNX graphs written by other frameworks (`bnserve fold`).

A linear layer is a `Gemm` (transA=0, any transB/alpha/beta, with or without C) or a `MatMul` on a
2-D input, optionally followed by an `Add` of a constant, whose weights are constants. A per-feature
affine step is an inference-mode `BatchNormalization` with constant statistics, or a constant
`Add`/`Sub`/`Mul`/`Div` (e.g. an input standardization). Rewrites, repeated until none applies:

1. linear -> affine steps                         -> one Gemm (fold into the preceding layer)
2. affine steps -> linear                         -> one Gemm (fold into the following layer)
3. BatchNormalization -> BatchNormalization (...) -> one BatchNormalization

Each tensor between two merged nodes must have no other consumer and must not be a graph output;
activations are never part of a chain, so nothing folds across a nonlinearity. Arithmetic is the
float64 code of `converter.fold`; new weights become NEW initializers (a weight shared with another
node is never changed in place) and initializers left unused are removed at the end. Graph inputs,
outputs, their names, order and shapes, the other nodes and the metadata stay as they were.

The package, one job per module: `graph` (index, opsets, shapes, constants), `layers` (linear
layers), `steps` (affine steps and chains), `rewrite` (the folds and the cleanup), `checks` (safety
rules, `fold_model`), `gate` (the reference the shared parity gate of converter/verify.py judges against), `command` (`fold_onnx_file`).
"""

from __future__ import annotations

from bnserve.converter.foreign.checks import fold_model, refuse_unsafe
from bnserve.converter.foreign.command import FoldResult, fold_onnx_file
from bnserve.converter.foreign.gate import _run_float64, fold_reference, to_float64

__all__ = [
    "FoldResult",
    "_run_float64",
    "fold_model",
    "fold_onnx_file",
    "fold_reference",
    "refuse_unsafe",
    "to_float64",
]
