"""Per-feature affine steps (inference BatchNormalization, constant Add/Sub/Mul/Div) and their
chains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from bnserve.converter import fold
from bnserve.converter.foreign.graph import (
    AFFINE_OPS,
    LARGE_SCALE,
    MIN_BN_OPSET,
    Array,
    GraphIndex,
    constant,
    is_float,
    label,
    per_feature,
)


@dataclass
class Step:
    """One per-feature affine node: `out = s * data + t` (s, t float64, length n or 1)."""

    node: onnx.NodeProto
    data: str
    s: Array
    t: Array
    bn: dict[str, Any] | None = None  # statistics summary, for BatchNormalization


def bn_is_training(node: onnx.NodeProto) -> bool:
    """training_mode=1 (opset 14+), or the extra outputs that only training mode writes."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return bool(attrs.get("training_mode", 0)) or any(node.output[1:])


def bn_step(ix: GraphIndex, node: onnx.NodeProto) -> Step | str:
    if ix.opset < MIN_BN_OPSET:
        return f"BatchNormalization of opset {ix.opset} is not supported (opsets {MIN_BN_OPSET}+)"
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("spatial", 1) == 0:
        return "spatial=0 BatchNormalization is not supported"
    values = [constant(ix, name) for name in node.input[1:5]]
    names = ("scale", "bias", "mean", "var")
    missing = [n for n, v in zip(names, values, strict=True) if v is None]
    if len(values) < 4 or missing:
        return f"statistics are not constants ({', '.join(missing) or 'inputs missing'})"
    if not all(v.ndim == 1 and is_float(v) for v in values):
        return "statistics are not 1-D float vectors"
    gamma, beta, mean, var = values
    eps = float(attrs.get("epsilon", 1e-5))
    s, t = fold.bn_to_affine(gamma, beta, mean, var, eps)
    summary = {
        "epsilon": eps,
        "features": int(gamma.shape[0]),
        "min_var": float(np.min(var)) if var.size else None,
        "max_abs_s": float(np.max(np.abs(s))) if s.size else None,
    }
    summary["large_scale"] = bool(s.size and summary["max_abs_s"] > LARGE_SCALE)
    return Step(node, node.input[0], s, t, summary)


def elementwise_step(ix: GraphIndex, node: onnx.NodeProto, data: str) -> Step | str:
    """`data (+,-,*,/) constant` (or `constant (+,-,*) data`) with a per-feature constant."""
    a, b = node.input[0], node.input[1]
    if data not in (a, b) or a == b:
        return f"{node.op_type} does not read the tensor once"
    other = b if data == a else a
    c = constant(ix, other)
    c = None if c is None or not is_float(c) else per_feature(c)
    if c is None:
        return f"{node.op_type} {label(node)!r} has no per-feature float constant operand"
    c = c.astype(np.float64)
    op, data_first = node.op_type, data == a
    if op == "Add":
        return Step(node, data, np.ones_like(c), c)
    if op == "Sub":
        return (
            Step(node, data, np.ones_like(c), -c)
            if data_first
            else Step(node, data, -np.ones_like(c), c)
        )
    if op == "Mul":
        return Step(node, data, c, np.zeros_like(c))
    if op == "Div" and data_first and np.all(c != 0) and np.all(np.isfinite(c)):
        return Step(node, data, 1.0 / c, np.zeros_like(c))
    return f"{op} {label(node)!r} is not an affine map of its input"


def affine_step(ix: GraphIndex, node: onnx.NodeProto, data: str) -> Step | str:
    """`node` as a per-feature affine map of its input `data`, or the reason it is not one."""
    if node.domain not in ("", "ai.onnx"):
        return f"{node.op_type} is not an ONNX operator"
    if node.op_type == "BatchNormalization":
        return bn_step(ix, node) if node.input[0] == data else "not the BN's data input"
    if node.op_type in AFFINE_OPS and len(node.input) == 2:
        return elementwise_step(ix, node, data)
    return f"{node.op_type} {label(node)!r} is not a per-feature affine step"


def _fits(step: Step, n: int) -> bool:
    return step.s.shape[0] in (1, n) and step.t.shape[0] in (1, n)


def _has_features(ix: GraphIndex, tensor: str, n: int) -> bool:
    """The tensor is known to be `[batch, n]`: then a per-feature step keeps its shape."""
    shape = ix.shapes.get(tensor)
    return shape is not None and len(shape) == 2 and shape[1] == n


def chain_after(ix: GraphIndex, tensor: str, n: int) -> list[Step]:
    """The longest run of affine steps reading `tensor` ([batch, n]) one after another, each
    intermediate tensor having that one reader and not being a graph output."""
    steps: list[Step] = []
    while (node := ix.sole_consumer(tensor)) is not None:
        step = affine_step(ix, node, tensor)
        if isinstance(step, str) or not _fits(step, n):
            break
        steps.append(step)
        tensor = node.output[0]
    return steps


def chain_before(ix: GraphIndex, tensor: str, n: int) -> list[Step]:
    """The longest run of affine steps ending in `tensor` (read by one linear layer), in order."""
    steps: list[Step] = []
    while (node := ix.producer.get(tensor)) is not None and ix.sole_consumer(tensor) is not None:
        data = _data_input(ix, node)
        step = affine_step(ix, node, data) if data else "no single variable input"
        if isinstance(step, str) or not _fits(step, n) or not _has_features(ix, step.data, n):
            break
        steps.insert(0, step)
        tensor = step.data
    return steps


def _data_input(ix: GraphIndex, node: onnx.NodeProto) -> str | None:
    if node.op_type == "BatchNormalization":
        return node.input[0]
    variable = [i for i in node.input if constant(ix, i) is None]
    return variable[0] if len(variable) == 1 else None


def compose(steps: list[Step], n: int) -> tuple[Array, Array]:
    s, t = np.ones(n), np.zeros(n)
    for st in steps:
        s, t = fold.compose_affine((s, t), (np.broadcast_to(st.s, n), np.broadcast_to(st.t, n)))
    return s, t
