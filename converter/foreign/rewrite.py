"""The rewrites that fold chains of affine steps into linear layers, and the cleanup after them."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnserve.converter import fold
from bnserve.converter.foreign.graph import (
    Array,
    GraphIndex,
    constant,
    default_opset,
    infer_shapes,
    label,
    node_inputs,
)
from bnserve.converter.foreign.layers import Linear, linear_at
from bnserve.converter.foreign.steps import (
    Step,
    affine_step,
    bn_step,
    chain_after,
    chain_before,
    compose,
)


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
        nodes = lin.nodes + [st.node for st in steps]
        return self._merge("preceding", lin, steps, nodes, lin.x, steps[-1].node.output[0], W, b)

    def try_following(self, ix: GraphIndex, lin: Linear) -> bool:
        n = lin.W.shape[0]
        steps = chain_before(ix, lin.x, n)
        if not steps:
            return False
        W, b = fold.fold_affine_into_following_linear(lin.W, lin.b, *compose(steps, n))
        nodes = [st.node for st in steps] + lin.nodes
        return self._merge("following", lin, steps, nodes, steps[0].data, lin.y, W, b)

    def _merge(
        self,
        where: str,
        lin: Linear,
        steps: list[Step],
        nodes: list[onnx.NodeProto],
        x: str,
        y: str,
        W: Array,
        b: Array,
    ) -> bool:
        """Replace `nodes` (the layer and its chain) by one Gemm `y = x @ W + b`, folded into the
        `where` ("preceding" or "following") layer; keep them when the weights overflow float32."""
        node = self.write_gemm(lin, x, y, W, b)
        if node is None:
            self.warnings.append(f"folding into {label(lin.nodes[0])!r} overflows float32; kept")
            return False
        self.replace(nodes, node)
        self.record(steps, "folded", f"into the {where} {_kind(lin)}", label(node))
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
        """Apply the first rule (in RULES order) that folds something; False when none does."""
        ix = self.index()
        found: dict[Callable, list[Any]] = {}
        for candidates, method in RULES:
            if candidates not in found:
                found[candidates] = candidates(ix, self.model.graph)
            for item in found[candidates]:
                if getattr(self, method)(ix, item):
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


def linear_layers(ix: GraphIndex, graph: onnx.GraphProto) -> list[Linear]:
    return [lin for n in graph.node if isinstance(lin := linear_at(ix, n), Linear)]


def batchnorms(ix: GraphIndex, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.op_type == "BatchNormalization"]


# The rewrite rules in the order they are tried: (what a rule looks at, the Folder method that
# tries one of them). The first rule that folds something wins, then the graph is indexed again.
# A new rule is a method and one line here.
RULES: tuple[tuple[Callable[[GraphIndex, onnx.GraphProto], list[Any]], str], ...] = (
    (linear_layers, "try_preceding"),  # linear -> affine steps: into the preceding layer
    (linear_layers, "try_following"),  # affine steps -> linear: into the following layer
    (batchnorms, "try_merge_bns"),  # BatchNormalization -> BatchNormalization: one BN
)


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
