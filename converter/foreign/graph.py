"""The graph index (who produces and consumes each tensor), opsets, shapes, and constants."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnserve.errors import ModelError

Array = np.ndarray

MIN_BN_OPSET = 9
# |s| above this loses float32 precision once folded (docs/folding.md, pitfalls).
LARGE_SCALE = 1e4
AFFINE_OPS = ("Add", "Sub", "Mul", "Div")
FLOAT_TYPES = (np.float16, np.float32, np.float64)


@dataclass
class GraphIndex:
    """Who produces and who consumes each tensor of the (top-level) graph, rebuilt after a rewrite."""

    graph: onnx.GraphProto
    opset: int
    shapes: dict[str, tuple[Any, ...]]
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    graph_inputs: set[str] = field(default_factory=set)
    graph_outputs: set[str] = field(default_factory=set)

    @classmethod
    def build(cls, graph: onnx.GraphProto, opset: int, shapes: dict[str, tuple[Any, ...]]):
        ix = cls(graph, opset, shapes)
        ix.initializers = {t.name: t for t in graph.initializer}
        ix.graph_inputs = {v.name for v in graph.input}
        ix.graph_outputs = {v.name for v in graph.output}
        for node in graph.node:
            for name in node.output:
                if name:
                    ix.producer[name] = node
            for name in node_inputs(node):
                ix.consumers.setdefault(name, []).append(node)
        return ix

    def sole_consumer(self, tensor: str) -> onnx.NodeProto | None:
        """The one node reading `tensor`, if it has exactly one reader and is not a graph output."""
        users = self.consumers.get(tensor, [])
        if tensor in self.graph_outputs or len(users) != 1:
            return None
        return users[0]


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """The node's inputs plus every outer tensor its subgraphs (If/Loop/Scan bodies) may read."""
    names = [n for n in node.input if n]
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in g.node:
                names += node_inputs(sub)
    return names


def label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}->{node.output[0]}"


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise ModelError("the model imports no default-domain (ai.onnx) opset")


def infer_shapes(model: onnx.ModelProto) -> dict[str, tuple[Any, ...]]:
    """Shape of every tensor that shape inference can tell (dims: int, symbol name, or None)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # a foreign model may defeat inference; folds then need Gemm-known shapes
        inferred = model
    g = inferred.graph
    shapes: dict[str, tuple[Any, ...]] = {}
    for v in [*g.input, *g.value_info, *g.output]:
        tt = v.type.tensor_type
        if v.type.HasField("tensor_type") and tt.HasField("shape"):
            shapes[v.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                for d in tt.shape.dim
            )
    return shapes


def constant(ix: GraphIndex, name: str) -> Array | None:
    """The value of `name` if it is a constant: an initializer that is not an (overridable) graph
    input, a `Constant` node, or an `Identity` of either; otherwise None."""
    if not name or name in ix.graph_inputs:
        return None
    if name in ix.initializers:
        return numpy_helper.to_array(ix.initializers[name])
    node = ix.producer.get(name)
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Identity":
        return constant(ix, node.input[0])
    if node.op_type == "Constant" and node.attribute:
        attr = node.attribute[0]
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_floats"):
            return np.array(helper.get_attribute_value(attr), dtype=np.float32)
        if attr.name in ("value_int", "value_ints"):
            return np.array(helper.get_attribute_value(attr), dtype=np.int64)
    return None


def is_float(a: Array) -> bool:
    return a.dtype.type in FLOAT_TYPES


def per_feature(c: Array) -> Array | None:
    """A constant broadcast along the feature axis of a `[batch, n]` tensor, as a 1-D array
    (length 1 for a scalar), or None when it would broadcast over rows or add dimensions."""
    if c.ndim == 0 or c.shape == (1, 1):
        return c.reshape(1)
    if c.ndim == 1:
        return c
    if c.ndim == 2 and c.shape[0] == 1:
        return c.reshape(-1)
    return None
