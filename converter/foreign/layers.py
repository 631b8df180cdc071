"""Linear layers: Gemm or MatMul(+Add) with constant weights, as one (W, b)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from bnserve.converter.foreign.graph import (
    Array,
    GraphIndex,
    constant,
    is_float,
    label,
    per_feature,
)


@dataclass
class Linear:
    """`y = x @ W + b` made of `nodes`; W float64 `[in, out]`, b float64 `[out]` or None."""

    nodes: list[onnx.NodeProto]
    x: str
    y: str
    W: Array
    b: Array | None
    dtype: np.dtype
    transB: bool  # the layout to write back (torch's Gemm uses [out, in])


def linear_at(ix: GraphIndex, node: onnx.NodeProto) -> Linear | str:
    """The linear layer that starts at `node`, or the reason it is not one."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in ("Gemm", "MatMul"):
        return f"{node.op_type} is not a linear layer"
    B = constant(ix, node.input[1])
    if B is None or B.ndim != 2 or not is_float(B):
        return f"{node.op_type} {label(node)!r} has no constant 2-D float weight"
    if node.op_type == "Gemm":
        return _gemm_layer(ix, node, B)
    return _matmul_layer(ix, node, B)


def _gemm_layer(ix: GraphIndex, node: onnx.NodeProto, B: Array) -> Linear | str:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0):
        return f"Gemm {label(node)!r} has transA=1"
    trans_b = bool(attrs.get("transB", 0))
    W = float(attrs.get("alpha", 1.0)) * (B.T if trans_b else B).astype(np.float64)
    b = None
    if len(node.input) > 2 and node.input[2]:
        C = constant(ix, node.input[2])
        C = None if C is None else per_feature(C)
        if C is None or C.shape[0] not in (1, W.shape[1]):
            return f"Gemm {label(node)!r} has a C that is not a constant per-output bias"
        b = float(attrs.get("beta", 1.0)) * np.broadcast_to(C.astype(np.float64), (W.shape[1],))
    return Linear([node], node.input[0], node.output[0], W, b, B.dtype, trans_b)


def _matmul_layer(ix: GraphIndex, node: onnx.NodeProto, B: Array) -> Linear | str:
    shape = ix.shapes.get(node.input[0])
    if shape is None or len(shape) != 2:
        return f"MatMul {label(node)!r} input is not known to be 2-D"
    lin = Linear([node], node.input[0], node.output[0], B.astype(np.float64), None, B.dtype, False)
    add = ix.sole_consumer(node.output[0])
    if add is not None and add.op_type == "Add" and add.domain in ("", "ai.onnx"):
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        c = constant(ix, other)
        c = None if c is None or not is_float(c) else per_feature(c)
        if c is not None and c.shape[0] in (1, B.shape[1]):
            lin.nodes.append(add)
            lin.y = add.output[0]
            lin.b = np.broadcast_to(c.astype(np.float64), (B.shape[1],)).copy()
    return lin
