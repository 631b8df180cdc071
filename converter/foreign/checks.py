"""The safety rules, why a BatchNormalization is kept, and `fold_model` (rewrite until nothing
applies)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import onnx

from bnserve.converter.foreign.graph import (
    LARGE_SCALE,
    MIN_BN_OPSET,
    GraphIndex,
    default_opset,
    label,
)
from bnserve.converter.foreign.layers import Linear, linear_at
from bnserve.converter.foreign.rewrite import Folder
from bnserve.converter.foreign.steps import Step, bn_is_training, bn_step
from bnserve.errors import ModelError


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
