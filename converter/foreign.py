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
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnserve import __version__
from bnserve.atomic import atomic_path, check_output_path, write_text_atomic
from bnserve.converter import export, fold, verify
from bnserve.converter.inspect import load_model
from bnserve.errors import BnserveError, ModelError, ParityError, UsageError

Array = np.ndarray

MIN_BN_OPSET = 9
# |s| above this loses float32 precision once folded (docs/folding.md, pitfalls).
LARGE_SCALE = 1e4
_AFFINE_OPS = ("Add", "Sub", "Mul", "Div")
_FLOAT_TYPES = (np.float16, np.float32, np.float64)


# ----------------------------------------------------------------------------- graph index


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


# ----------------------------------------------------------------------------- constants


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


def _is_float(a: Array) -> bool:
    return a.dtype.type in _FLOAT_TYPES


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


# ----------------------------------------------------------------------------- linear layers


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
    if B is None or B.ndim != 2 or not _is_float(B):
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
        c = None if c is None or not _is_float(c) else per_feature(c)
        if c is not None and c.shape[0] in (1, B.shape[1]):
            lin.nodes.append(add)
            lin.y = add.output[0]
            lin.b = np.broadcast_to(c.astype(np.float64), (B.shape[1],)).copy()
    return lin


# ----------------------------------------------------------------------------- affine steps


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
    if not all(v.ndim == 1 and _is_float(v) for v in values):
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
    c = None if c is None or not _is_float(c) else per_feature(c)
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
    if node.op_type in _AFFINE_OPS and len(node.input) == 2:
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


# ----------------------------------------------------------------------------- rewriting


class Folder:
    """Applies the rewrites to a copy of the model and records what happened to each node."""

    def __init__(self, model: onnx.ModelProto):
        self.model = copy.deepcopy(model)
        self.opset = default_opset(self.model)
        self.shapes = infer_shapes(self.model)
        self.events: dict[str, dict[str, Any]] = {}
        self.names = {t.name for t in self.model.graph.initializer} | {
            o for n in self.model.graph.node for o in n.output
        }
        self.warnings: list[str] = []

    def index(self) -> GraphIndex:
        return GraphIndex.build(self.model.graph, self.opset, self.shapes)

    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}.{k}"
        self.names.add(name)
        return name

    def add_init(self, array: Array, base: str, dtype: np.dtype) -> str | None:
        with np.errstate(over="ignore", invalid="ignore"):
            cast = np.ascontiguousarray(array, dtype=dtype)
        if not np.all(np.isfinite(cast)):
            return None
        name = self.fresh(base)
        self.model.graph.initializer.append(numpy_helper.from_array(cast, name))
        return name

    def replace(self, old: list[onnx.NodeProto], new: onnx.NodeProto) -> None:
        """Put `new` where the last of `old` was (its inputs are all produced before that).
        Nodes are told apart by their outputs: a graph assigns each tensor once."""
        g = self.model.graph
        keys = {_key(n) for n in old}
        positions = [i for i, n in enumerate(g.node) if _key(n) in keys]
        kept = [n for n in g.node if _key(n) not in keys]
        kept.insert(positions[-1] - (len(positions) - 1), new)
        del g.node[:]
        g.node.extend(kept)

    def write_gemm(self, lin: Linear, x: str, y: str, W: Array, b: Array) -> onnx.NodeProto | None:
        main = lin.nodes[0]
        base = main.name or main.output[0]
        w = self.add_init(W.T if lin.transB else W, f"{base}.weight_folded", lin.dtype)
        bias = self.add_init(b, f"{base}.bias_folded", lin.dtype)
        if w is None or bias is None:
            return None
        attrs = {"transB": 1} if lin.transB else {}
        return helper.make_node("Gemm", [x, w, bias], [y], name=main.name or None, **attrs)

    def record(self, steps: list[Step], status: str, how: str, into: str) -> None:
        names = [label(st.node) for st in steps]
        for st in steps:
            self.events[label(st.node)] = {
                "op": st.node.op_type,
                "status": status,
                "how": how,
                "into": into,
                "together_with": [o for o in names if o != label(st.node)],
                **(st.bn or {}),
            }

    def try_preceding(self, ix: GraphIndex, lin: Linear) -> bool:
        n = lin.W.shape[1]
        steps = chain_after(ix, lin.y, n)
        if not steps:
            return False
        W, b = fold.fold_affine_into_preceding_linear(lin.W, lin.b, *compose(steps, n))
        node = self.write_gemm(lin, lin.x, steps[-1].node.output[0], W, b)
        if node is None:
            self.warnings.append(f"folding into {label(lin.nodes[0])!r} overflows float32; kept")
            return False
        self.replace(lin.nodes + [st.node for st in steps], node)
        self.record(steps, "folded", f"into the preceding {_kind(lin)}", label(node))
        return True

    def try_following(self, ix: GraphIndex, lin: Linear) -> bool:
        n = lin.W.shape[0]
        steps = chain_before(ix, lin.x, n)
        if not steps:
            return False
        W, b = fold.fold_affine_into_following_linear(lin.W, lin.b, *compose(steps, n))
        node = self.write_gemm(lin, steps[0].data, lin.y, W, b)
        if node is None:
            self.warnings.append(f"folding into {label(lin.nodes[0])!r} overflows float32; kept")
            return False
        self.replace([st.node for st in steps] + lin.nodes, node)
        self.record(steps, "folded", f"into the following {_kind(lin)}", label(node))
        return True

    def try_merge_bns(self, ix: GraphIndex, node: onnx.NodeProto) -> bool:
        first = bn_step(ix, node)
        if isinstance(first, str):
            return False
        n = first.s.shape[0]
        steps = [first]
        tensor = node.output[0]
        while (nxt := ix.sole_consumer(tensor)) is not None and nxt.op_type == "BatchNormalization":
            step = affine_step(ix, nxt, tensor)
            if isinstance(step, str) or step.s.shape[0] != n:
                break
            steps.append(step)
            tensor = nxt.output[0]
        if len(steps) < 2:
            return False
        s, t = compose(steps, n)
        dtype = constant(ix, node.input[1]).dtype  # bn_step succeeded: it is a constant
        base = node.name or node.output[0]
        inputs = [
            self.add_init(a, f"{base}.{k}_merged", dtype)
            for a, k in ((s, "scale"), (t, "bias"), (np.zeros(n), "mean"), (np.ones(n), "var"))
        ]
        if any(i is None for i in inputs):
            return False
        merged = helper.make_node(
            "BatchNormalization",
            [first.data, *inputs],
            [tensor],
            name=node.name or None,
            epsilon=0.0,
        )
        self.replace([st.node for st in steps], merged)
        self.record(steps, "merged", "with the BatchNormalization nodes next to it", label(merged))
        return True

    def step_once(self) -> bool:
        ix = self.index()
        linears = [
            lin for n in self.model.graph.node if isinstance(lin := linear_at(ix, n), Linear)
        ]
        for lin in linears:
            if self.try_preceding(ix, lin):
                return True
        for lin in linears:
            if self.try_following(ix, lin):
                return True
        for node in self.model.graph.node:
            if node.op_type == "BatchNormalization" and self.try_merge_bns(ix, node):
                return True
        return False

    def run(self) -> onnx.ModelProto:
        dead_before = _dead_pure_nodes(self.model.graph)
        while self.step_once():
            pass
        remove_dead_pure_nodes(self.model.graph, keep={_key(n) for n in dead_before})
        remove_unused_initializers(self.model.graph)
        prune_value_info(self.model.graph)
        return self.model


def _key(node: onnx.NodeProto) -> tuple[str, ...]:
    return tuple(node.output)


def _kind(lin: Linear) -> str:
    return "+".join(n.op_type for n in lin.nodes)


def _dead_pure_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    used = {n for node in graph.node for n in node_inputs(node)} | {o.name for o in graph.output}
    return [
        n
        for n in graph.node
        if n.op_type in ("Constant", "Identity") and not any(o in used for o in n.output)
    ]


def remove_dead_pure_nodes(graph: onnx.GraphProto, keep: set[tuple[str, ...]]) -> None:
    """Remove the Constant/Identity nodes that fed only folded nodes (side-effect free)."""
    while dead := [n for n in _dead_pure_nodes(graph) if _key(n) not in keep]:
        keys = {_key(n) for n in dead}
        kept = [n for n in graph.node if _key(n) not in keys]
        del graph.node[:]
        graph.node.extend(kept)


def remove_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {n for node in graph.node for n in node_inputs(node)}
    used |= {v.name for v in graph.input} | {v.name for v in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def prune_value_info(graph: onnx.GraphProto) -> None:
    """Drop shape annotations of tensors that no longer exist (the folded intermediates)."""
    alive = {o for n in graph.node for o in n.output}
    kept = [v for v in graph.value_info if v.name in alive]
    del graph.value_info[:]
    graph.value_info.extend(kept)


# ----------------------------------------------------------------------------- checks and report


def find_batchnorms(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [
        n for n in graph.node if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
    ]


def refuse_unsafe(model: onnx.ModelProto) -> None:
    """Refuse (ModelError) a training-mode BN, and constant statistics that are corrupt."""
    ix = GraphIndex.build(model.graph, default_opset(model), {})
    for node in find_batchnorms(model.graph):
        if bn_is_training(node):
            raise ModelError(
                f"BatchNormalization {label(node)!r} is in training mode (training_mode=1 or "
                "running-statistics outputs): its output depends on the batch, so it cannot be "
                "folded. Export the model in eval mode (model.eval() in PyTorch)"
            )
        if ix.opset < MIN_BN_OPSET:
            continue
        try:
            step = bn_step(ix, node)
        except ValueError as exc:
            raise ModelError(f"BatchNormalization {label(node)!r} is corrupt: {exc}") from exc
        if isinstance(step, Step) and not (
            np.all(np.isfinite(step.s)) and np.all(np.isfinite(step.t))
        ):
            raise ModelError(
                f"BatchNormalization {label(node)!r} has non-finite statistics (NaN or inf)"
            )


def why_kept(ix: GraphIndex, node: onnx.NodeProto) -> str:
    """Why a BatchNormalization is still in the folded graph."""
    step = bn_step(ix, node)
    if isinstance(step, str):
        return step
    src = ix.producer.get(node.input[0])
    before = "the model input" if src is None else f"{src.op_type} {label(src)!r}"
    users = ix.consumers.get(node.output[0], [])
    after = ", ".join(f"{u.op_type} {label(u)!r}" for u in users) or "nothing"
    if node.output[0] in ix.graph_outputs:
        after += " and the graph output"
    if src is not None and isinstance(linear_at(ix, src), Linear):
        mid = src.output[0] if src.op_type == "Gemm" else node.input[0]
        if len(ix.consumers.get(mid, [])) > 1 or mid in ix.graph_outputs:
            return (
                f"the linear layer's output {mid!r} is also used elsewhere (or is a graph output)"
            )
    return f"no linear layer to fold into: it reads {before} and feeds {after}"


def op_counts(graph: onnx.GraphProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in graph.node).items()))


def fold_model(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Fold what is safe to fold; return the new model and the fold report (nothing written)."""
    refuse_unsafe(model)
    folder = Folder(model)
    bns = [label(n) for n in find_batchnorms(model.graph)]
    folded = folder.run()
    ix = folder.index()
    remaining = {label(n): n for n in find_batchnorms(folded.graph)}
    entries = []
    for name in bns:
        entry = {"node": name, "status": "kept", **folder.events.get(name, {})}
        if entry["status"] != "folded":
            # A kept BN is still there under its name, a merged one under the merged node's.
            node = remaining.get(entry.get("into", name))
            entry["reason"] = why_kept(ix, node) if node is not None else "unknown"
            step = bn_step(ix, node) if node is not None else None
            if isinstance(step, Step) and entry["status"] == "kept":
                entry.update(step.bn or {})
        entries.append(entry)
        if entry.get("large_scale"):
            folder.warnings.append(
                f"BatchNormalization {name!r}: max |s| {entry['max_abs_s']:.3g} > {LARGE_SCALE:g} "
                "(tiny variance with large gamma): float32 precision loss"
            )
    affine = [{"node": k, **v} for k, v in folder.events.items() if k not in bns]
    report = {
        "kind": "foreign",
        "opset": folder.opset,
        "batchnorms": entries,
        "affine_ops": affine,
        "nodes_before": len(model.graph.node),
        "nodes_after": len(folded.graph.node),
        "operators_before": op_counts(model.graph),
        "operators_after": op_counts(folded.graph),
        "initializers_before": len(model.graph.initializer),
        "initializers_after": len(folded.graph.initializer),
        "warnings": folder.warnings,
    }
    return folded, report


# ----------------------------------------------------------------------------- parity gate


def load_foreign_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file with its external data; ModelError for anything that is not one."""
    model = load_model(path)  # refuses a missing file, a directory, bytes that are not ONNX
    tensors = list(model.graph.initializer)
    if any(onnx.external_data_helper.uses_external_data(t) for t in tensors):
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(Path(path).parent))
        except OSError as exc:
            raise ModelError(f"{path}: cannot read its external data ({exc})") from exc
    return model


def _model_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in inits]
    if len(inputs) != 1:
        raise ModelError(
            f"the parity gate feeds one input; this model has {len(inputs)}: "
            + ", ".join(repr(v.name) for v in inputs)
        )
    return inputs[0]


def probe_inputs(model: onnx.ModelProto, probe: str | os.PathLike[str] | None) -> Array:
    """Probe rows for the model's single input: `probe` (a .npy file) or, for a `[batch, F]`
    float input, the gate's seeded random rows (standard normal plus extremes)."""
    v = _model_input(model)
    dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
    dims = [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
    if probe is not None:
        try:
            X = np.load(probe, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--probe {probe}: not a readable .npy array ({exc})") from exc
        if X.ndim != len(dims) or any(
            d is not None and d != x for d, x in zip(dims[1:], X.shape[1:], strict=True)
        ):
            raise UsageError(
                f"--probe {probe}: shape {X.shape} does not fit input {v.name!r} {dims}"
            )
        if X.shape[0] == 0 or not np.can_cast(X.dtype, dtype, casting="same_kind"):
            raise UsageError(f"--probe {probe}: need at least one row of {dtype} values")
        return X.astype(dtype)
    if len(dims) != 2 or dims[1] is None or dtype.type not in _FLOAT_TYPES:
        raise ModelError(
            f"input {v.name!r} is not a float [batch, F] tensor with a known F ({dims}); "
            "give probe rows with --probe FILE.npy"
        )
    F = int(dims[1])
    return verify.make_probes(np.zeros(F), np.ones(F)).astype(dtype)


def _run(
    model: str | bytes | os.PathLike[str], X: Array, level: str, what: str
) -> dict[str, Array]:
    try:
        return verify.run_model(model, X, level)
    except BnserveError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"onnxruntime cannot run the {what}: {exc}") from exc


def _rows(a: Array) -> Array:
    a = np.asarray(a)
    return a.reshape(a.shape[0], -1) if a.ndim >= 1 else a.reshape(1, 1)


def to_float64(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy computing in float64: float32 and float16 initializers, Constant values, Cast
    targets and declared tensor types become double (probes are exact in both). float16 too:
    otherwise a half-precision model's "float64" reference is the model itself, its noise floor
    0, and every correct fold of it fails the gate."""
    m = copy.deepcopy(model)
    g = m.graph
    DOUBLE = onnx.TensorProto.DOUBLE
    NARROW = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)

    def widen(t: onnx.TensorProto) -> onnx.TensorProto:
        if t.data_type not in NARROW:
            return t
        return numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float64), t.name)

    for i, t in enumerate(g.initializer):
        g.initializer[i].CopyFrom(widen(t))
    for node in g.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                attr.t.CopyFrom(widen(attr.t))
            elif node.op_type == "Constant" and attr.name in ("value_float", "value_floats"):
                value = np.array(helper.get_attribute_value(attr), dtype=np.float64)
                attr.CopyFrom(helper.make_attribute("value", numpy_helper.from_array(value)))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i in NARROW:
                attr.i = DOUBLE
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type in NARROW:
            v.type.tensor_type.elem_type = DOUBLE
    return m


def _run_float64(model: onnx.ModelProto, X: Array) -> tuple[dict[str, Array], str]:
    """`model` widened to float64 and run on `X`: in onnxruntime, or, where onnxruntime has no
    double kernel for one of its operators, in onnx's own reference evaluator (numpy, every
    operator in float64). Returns (outputs, the engine that ran them); raises when neither can."""
    wide = to_float64(model)
    x64 = X.astype(np.float64)
    try:
        return verify.run_model(export.serialize(wide), x64), "onnxruntime"
    except Exception as ort_error:
        from onnx.reference import ReferenceEvaluator

        try:
            evaluator = ReferenceEvaluator(wide)
            names = [o.name for o in wide.graph.output]
            values = evaluator.run(names, {wide.graph.input[0].name: x64})
        except Exception as ref_error:
            raise RuntimeError(
                f"onnxruntime: {type(ort_error).__name__}: {ort_error}; onnx.reference: "
                f"{type(ref_error).__name__}: {ref_error}"
            ) from None
        return dict(zip(names, (np.asarray(v) for v in values), strict=True)), "onnx.reference"


def _float64_outputs(
    model: onnx.ModelProto, X: Array, warn: Callable[[str], None] | None = None
) -> tuple[dict[str, Array] | None, str]:
    """The model run in float64 and the engine used, or (None, why) when no engine can."""
    try:
        return _run_float64(model, X)
    except Exception as exc:
        reason = f"no float64 evaluation possible ({exc})"
        if warn is not None:
            warn(f"the parity reference falls back to float32: {reason}")
        return None, reason


def _check_fold_float64(original: onnx.ModelProto, X: Array, ref: dict[str, Array]) -> float:
    """The same fold applied to the float64 copy must reproduce it up to float64 rounding: then
    the fold is right and the folded float32 weights' rounding is admissible noise."""
    folded64 = fold_model(to_float64(original))[0]
    out, _engine = _run_float64(folded64, X)
    worst = 0.0
    for name, value in ref.items():
        scale = max(1.0, float(np.max(np.abs(value), initial=0.0)))
        worst = max(worst, verify.max_abs_error(_rows(out[name]), _rows(value))[0] / scale)
    if not worst <= verify.FOLD_FLOAT64_TOLERANCE:
        raise ParityError(
            f"parity gate failed: the fold differs from the input model by {worst:.3g} (relative) "
            f"in float64 (allowed {verify.FOLD_FLOAT64_TOLERANCE:.0e}): a bnserve bug"
        )
    return worst


def parity_gate(
    original: onnx.ModelProto,
    folded: onnx.ModelProto,
    path: Path,
    X: Array,
    atol: float,
    warn: Callable[[str], None] | None = None,
) -> verify.ParityResult:
    """Every output of the folded file at both onnxruntime optimization levels against the input
    model run in float64: in onnxruntime, else in onnx's reference evaluator; only when neither
    can run it is the float32 input model the reference, and `warn` and the report say so.

    As in convert's gate the error may reach max(atol, 4 x the float32 noise floor), the floor
    being the input model's own float32 error and that of the folded float32 weights evaluated
    in float64 (admissible because the fold itself is first checked in float64); atol scales
    with an output's magnitude (1 for probabilities), as for convert's logits."""
    original_bytes = export.serialize(original)
    ref32 = _run(original_bytes, X, "disabled", "input model")
    ref64, engine = _float64_outputs(original, X, warn)
    samples = [_run(original_bytes, X, "all", "input model")]
    fold_check = None
    if ref64 is not None:
        fold_check = _check_fold_float64(original, X, ref64)
        samples += [ref32, _float64_outputs(folded, X)[0] or ref32]
    reference = ref64 if ref64 is not None else ref32
    candidate = {lv: _run(path, X, lv, "folded model (a bnserve bug)") for lv in verify.LEVELS}
    per_output: dict[str, Any] = {}
    failures = []
    for name, ref in reference.items():
        if not np.issubdtype(np.asarray(ref).dtype, np.floating):
            same = all(np.array_equal(candidate[lv][name], ref) for lv in candidate)
            per_output[name] = {"exact_match": same, "passed": same}
            if not same:
                failures.append(f"output {name!r}: values differ from the input model's")
            continue
        ref64_rows = _rows(ref).astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(ref64_rows), initial=0.0)))
        errors = [verify.max_abs_error(_rows(smp[name]), ref64_rows)[0] for smp in samples]
        baseline = errors[1] if ref64 is not None else errors[0]
        result = verify.evaluate_parity(
            {lv: _rows(out[name]) for lv, out in candidate.items()},
            ref64_rows,
            baseline,
            atol * scale,
            X,
            noise_floor=max(errors),
        )
        per_output[name] = {**result.report, "scale": scale}
        if not result.passed:
            failures.append(f"output {name!r}: {result.message}")
    first = per_output[next(iter(reference))]
    report = {
        **first,
        "atol": float(atol),
        "reference": f"input model in {engine}, float64"
        if ref64 is not None
        else f"input model in onnxruntime, float32: {engine}",
        "outputs": per_output,
        "passed": not failures,
    }
    if fold_check is not None:
        report["fold_float64_max_rel_diff"] = fold_check
    return verify.ParityResult(passed=not failures, report=report, message="\n".join(failures))


# ----------------------------------------------------------------------------- the command


@dataclass
class FoldResult:
    path: Path
    fold_report: dict[str, Any]
    parity_report: dict[str, Any]


def _set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Update or add `values` in metadata_props, keeping every other entry and the order."""
    existing = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value


def fold_onnx_file(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    atol: float = 1e-5,
    probe: str | os.PathLike[str] | None = None,
    report_path: str | os.PathLike[str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> FoldResult:
    """Fold, verify and write; raise a BnserveError (no model file written) on any refusal.

    The report (`report_path`) is written after a successful gate, and also when the gate fails
    (it is the diagnosis); never on a refusal."""
    if not (math.isfinite(atol) and atol >= 0):
        raise UsageError(f"--atol must be a finite number >= 0, got {atol}")
    output = check_output_path(output_path)
    if report_path is not None:
        check_output_path(report_path)
    source = Path(input_path)
    for target in (output, Path(report_path) if report_path is not None else None):
        # overwriting the input would lose the original the parity gate compares against
        if target is not None and target.exists() and source.exists() and target.samefile(source):
            raise UsageError(f"output path {target} is the input model itself; choose another file")
    original = load_foreign_model(input_path)
    refuse_unsafe(original)  # before onnxruntime, which may reject such a node less clearly
    X = probe_inputs(original, probe)
    _run(export.serialize(original), X[:1], "disabled", "input model")  # refuse before any work
    folded, report = fold_model(original)
    for w in report["warnings"]:
        if warn is not None:
            warn(w)
    metadata = {
        "bnserve.fold_report": export.to_json(report),
        "bnserve.parity_report": "",
        "bnserve.fold_source_sha256": hashlib.sha256(Path(input_path).read_bytes()).hexdigest(),
        "bnserve.converter_version": __version__,
    }
    _set_metadata(folded, metadata)
    try:
        onnx.checker.check_model(folded)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the folded graph fails onnx.checker (a bnserve bug): {exc}") from exc
    with atomic_path(output) as tmp:
        tmp.write_bytes(export.serialize(folded))
        result = parity_gate(original, folded, tmp, X, atol, warn)
        result.report["probe_source"] = str(probe) if probe is not None else "random"
        if not result.passed:
            if report_path is not None:
                write_text_atomic(report_path, _report_json(report, result.report))
            raise ParityError("parity gate failed: " + result.message)
        _set_metadata(folded, {"bnserve.parity_report": export.to_json(result.report)})
        tmp.write_bytes(export.serialize(folded))
        # The report first: if it cannot be written, the model is not renamed into place either.
        if report_path is not None:
            write_text_atomic(report_path, _report_json(report, result.report))
    return FoldResult(output, report, result.report)


def _report_json(fold_report: dict[str, Any], parity: dict[str, Any]) -> str:
    return json.dumps({"fold": fold_report, "parity": parity}, indent=2, sort_keys=True) + "\n"
