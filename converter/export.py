"""Build the ONNX graphs with `onnx.helper`: the folded one (Gemm, activation, Softmax only, behind
one Sub of the input means where the converter keeps the input centred) and the unfolded
reference (Sub/Div standardization, Gemm, BatchNormalization with its epsilon); for an ensemble,
its folded members side by side in one graph (`build_fused_model`, in one of
`ENSEMBLE_LAYOUTS`) and its members' unfolded graphs averaged (`build_unfolded_ensemble`).

The interface is the contract with the service: input `input` float32 `[batch, F]` (symbolic batch
dimension), output `probabilities` float32 `[batch, C]`, optionally a second output `logits`, and
the `bnserve.*` metadata keys. Building is deterministic: same arrays, same bytes (no timestamps,
node and tensor names derived from layer names, metadata in a fixed order).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bnserve import __version__
from bnserve.converter.frozen import FoldedMLP, FrozenMLP
from bnserve.converter.fuse import FusedEnsemble
from bnserve.errors import ModelError

# 21 is the newest opset onnxruntime 1.18 (the floor in pyproject.toml) runs, so a converted file
# loads in every supported runtime; 13 is the oldest we test (Softmax's semantics changed there).
DEFAULT_OPSET = 21
MIN_OPSET = 13
MAX_OPSET = onnx.defs.onnx_opset_version()

FORMAT_VERSION = "1"
INPUT_NAME = "input"
PROBABILITIES = "probabilities"
LOGITS = "logits"
BATCH_DIM = "batch"

# The metadata keys, in the order they are written (the contract with the service and inspect).
METADATA_KEYS = (
    "bnserve.format_version",
    "bnserve.labels",
    "bnserve.feature_names",
    "bnserve.output_kind",
    "bnserve.stats",
    "bnserve.fold_report",
    "bnserve.parity_report",
    "bnserve.source_sha256",
    "bnserve.data_fingerprint",
    "bnserve.converter_version",
)

_ACTIVATION_OPS = {"relu": "Relu", "leaky_relu": "LeakyRelu", "tanh": "Tanh", "sigmoid": "Sigmoid"}


def to_json(value: Any) -> str:
    """Compact, key-sorted JSON: the same report always serializes to the same string."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def conversion_metadata(
    *,
    labels: list[str],
    feature_names: list[str],
    stats: str,
    fold_report: dict[str, Any],
    parity_report: dict[str, Any] | None,
    source_sha256: str,
    data_fingerprint: str,
) -> dict[str, str]:
    """The `bnserve.*` metadata_props values (all strings, JSON where structured)."""
    return {
        "bnserve.format_version": FORMAT_VERSION,
        "bnserve.labels": json.dumps(list(labels), ensure_ascii=False),
        "bnserve.feature_names": json.dumps(list(feature_names), ensure_ascii=False),
        "bnserve.output_kind": "probabilities",
        "bnserve.stats": stats,
        "bnserve.fold_report": to_json(fold_report),
        "bnserve.parity_report": to_json(parity_report) if parity_report is not None else "",
        "bnserve.source_sha256": source_sha256,
        "bnserve.data_fingerprint": data_fingerprint,
        "bnserve.converter_version": __version__,
    }


def set_metadata(model: onnx.ModelProto, metadata: dict[str, str]) -> None:
    """Replace `model.metadata_props` with `metadata`, known keys first in contract order."""
    order = [k for k in METADATA_KEYS if k in metadata] + sorted(
        k for k in metadata if k not in METADATA_KEYS
    )
    del model.metadata_props[:]
    for key in order:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, metadata[key]


def _tensor(array: np.ndarray, name: str) -> TensorProto:
    # The one place float64 becomes float32: every fold happened before this.
    return numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name)


def _activation_node(kind: str, x: str, y: str, name: str, leaky_slope: float) -> onnx.NodeProto:
    op = _ACTIVATION_OPS[kind]
    if kind == "leaky_relu":
        return helper.make_node(op, [x], [y], name=name, alpha=float(leaky_slope))
    return helper.make_node(op, [x], [y], name=name)


def _softmax_head(nodes: list[onnx.NodeProto], last: str) -> None:
    """The output head of one network: its logits tensor -> Softmax -> `probabilities`."""
    if last != LOGITS:  # the last Gemm writes the logits tensor directly
        raise AssertionError("the output layer must write the 'logits' tensor")
    nodes.append(helper.make_node("Softmax", [LOGITS], [PROBABILITIES], name="softmax", axis=1))


def _wrap(
    nodes: list[onnx.NodeProto],
    initializers: list[TensorProto],
    n_features: int,
    n_classes: int,
    opset: int,
    logits: bool,
    doc: str,
    metadata: dict[str, str] | None,
) -> onnx.ModelProto:
    """The graph (input `input`, output `probabilities`, optionally `logits`) and its model."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelError(f"opset {opset} is not supported; choose {MIN_OPSET} to {MAX_OPSET}")
    inputs = [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_DIM, n_features])]
    outputs = [
        helper.make_tensor_value_info(PROBABILITIES, TensorProto.FLOAT, [BATCH_DIM, n_classes])
    ]
    if logits:
        outputs.append(
            helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [BATCH_DIM, n_classes])
        )
    graph = helper.make_graph(
        nodes, "bnserve_mlp", inputs, outputs, initializer=initializers, doc_string=doc
    )
    # make_model_gen_version picks the IR version that matches the opset, so older runtimes that
    # support the opset also accept the file.
    model = helper.make_model_gen_version(
        graph,
        producer_name="bnserve",
        producer_version=__version__,
        opset_imports=[helper.make_opsetid("", opset)],
    )
    if metadata:
        set_metadata(model, metadata)
    return model


def build_folded_model(
    folded: FoldedMLP,
    *,
    opset: int = DEFAULT_OPSET,
    logits: bool = False,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """input -> [Sub means] -> (Gemm -> activation)* -> Gemm -> Softmax; weights cast to float32
    here (the means of a centred fold are float32 values already)."""
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    x = INPUT_NAME
    doc = "bnserve MLP with batch normalization and input standardization folded into Gemm"
    if folded.input_center is not None:
        inits.append(_tensor(folded.input_center, "input.mean"))
        nodes.append(
            helper.make_node("Sub", [x, "input.mean"], ["input.centred"], name="input.sub")
        )
        x = "input.centred"
        doc = (
            "bnserve MLP with batch normalization and the input scaling folded into Gemm; the "
            "input means are subtracted first (kept for float32 precision)"
        )
    for layer in folded.layers:
        w, b = f"{layer.name}.weight", f"{layer.name}.bias"
        inits += [_tensor(layer.W, w), _tensor(layer.b, b)]
        z = LOGITS if layer.activation is None else f"{layer.name}.linear"
        nodes.append(helper.make_node("Gemm", [x, w, b], [z], name=f"{layer.name}.gemm"))
        if layer.activation is not None:
            x = f"{layer.name}.out"
            nodes.append(
                _activation_node(layer.activation, z, x, f"{layer.name}.act", folded.leaky_slope)
            )
        else:
            x = z
    n_features = int(folded.layers[0].W.shape[0])
    n_classes = int(folded.layers[-1].W.shape[1])
    _softmax_head(nodes, x)
    return _wrap(nodes, inits, n_features, n_classes, opset, logits, doc, metadata)


def build_unfolded_model(
    net: FrozenMLP,
    *,
    opset: int = DEFAULT_OPSET,
    logits: bool = False,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """The reference graph: Sub/Div, Gemm, BatchNormalization (epsilon as the float32 attribute
    ONNX allows), activation, Softmax. The parity gate's float32 baseline runs this graph."""
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    last = _unfolded_layers(net, "", nodes, inits)
    _softmax_head(nodes, last)
    doc = "bnserve MLP, unfolded: standardization and BatchNormalization kept"
    return _wrap(nodes, inits, net.n_features, net.n_classes, opset, logits, doc, metadata)


def _unfolded_layers(
    net: FrozenMLP, prefix: str, nodes: list[onnx.NodeProto], inits: list[TensorProto]
) -> str:
    """Append the unfolded network from `input` to its logits, every tensor and node name
    starting with `prefix`; returns the logits' name (`{prefix}logits`)."""
    inits.append(_tensor(net.input_mean, f"{prefix}input.mean"))
    inits.append(_tensor(net.input_std, f"{prefix}input.std"))
    nodes.append(
        helper.make_node(
            "Sub",
            [INPUT_NAME, f"{prefix}input.mean"],
            [f"{prefix}input.centered"],
            name=f"{prefix}input.sub",
        )
    )
    nodes.append(
        helper.make_node(
            "Div",
            [f"{prefix}input.centered", f"{prefix}input.std"],
            [f"{prefix}input.standardized"],
            name=f"{prefix}input.div",
        )
    )
    x = f"{prefix}input.standardized"

    def add_bn(name: str, bn: Any, src: str, dst: str) -> None:
        names = [f"{name}.bn.{k}" for k in ("scale", "bias", "mean", "var")]
        for arr, n in zip((bn.gamma, bn.beta, bn.mean, bn.var), names, strict=True):
            inits.append(_tensor(arr, n))
        nodes.append(
            helper.make_node(
                "BatchNormalization", [src, *names], [dst], name=f"{name}.bn", epsilon=float(bn.eps)
            )
        )

    for i, layer in enumerate(net.hidden):
        name = f"{prefix}hidden.{i}"
        w = f"{name}.weight"
        inits.append(_tensor(layer.W, w))
        gemm_in = [x, w]
        if layer.b is not None:
            inits.append(_tensor(layer.b, f"{name}.bias"))
            gemm_in.append(f"{name}.bias")
        z = f"{name}.linear"
        nodes.append(helper.make_node("Gemm", gemm_in, [z], name=f"{name}.gemm"))
        if layer.bn is not None and net.placement == "before":
            add_bn(name, layer.bn, z, f"{name}.normalized")
            z = f"{name}.normalized"
        a = f"{name}.activated"
        nodes.append(_activation_node(net.activation, z, a, f"{name}.act", net.leaky_slope))
        if layer.bn is not None and net.placement == "after":
            add_bn(name, layer.bn, a, f"{name}.normalized")
            a = f"{name}.normalized"
        x = a
    out = f"{prefix}output"
    inits += [_tensor(net.output_W, f"{out}.weight"), _tensor(net.output_b, f"{out}.bias")]
    logits = f"{prefix}{LOGITS}"
    nodes.append(
        helper.make_node("Gemm", [x, f"{out}.weight", f"{out}.bias"], [logits], name=f"{out}.gemm")
    )
    return logits


# --- ensembles (converter/fuse.py) ------------------------------------------------------------

#: How a fused ensemble's layers after the first are laid out: "batched", one MatMul per layer
#: over a `[K, batch, width]` tensor with `[K, in, out]` weights; "blockdiag", one Gemm per layer
#: over `[batch, K*width]` with block-diagonal `[K*in, K*out]` weights (zeros off the blocks).
ENSEMBLE_LAYOUTS = ("batched", "blockdiag")
#: The faster of the two on the CPU it was measured on (bench/ensemble_layout.py, docs/folding.md).
DEFAULT_LAYOUT = "batched"


def _shape_const(name: str, dims: list[int]) -> TensorProto:
    return numpy_helper.from_array(np.array(dims, dtype=np.int64), name)


def _mean_over(x: str, y: str, axis: int, opset: int, nodes: list, inits: list) -> None:
    """`y = mean of x over axis` (dropped): ReduceMean takes its axes as an input from opset 18,
    as an attribute before."""
    if opset >= 18:
        inits.append(_shape_const("ensemble.mean_axes", [axis]))
        nodes.append(
            helper.make_node(
                "ReduceMean", [x, "ensemble.mean_axes"], [y], name="ensemble.mean", keepdims=0
            )
        )
    else:
        nodes.append(
            helper.make_node("ReduceMean", [x], [y], name="ensemble.mean", axes=[axis], keepdims=0)
        )


def block_diagonal(W: np.ndarray) -> np.ndarray:
    """`[K, in, out]` -> `[K*in, K*out]` with member k's block at (k*in, k*out), zeros elsewhere."""
    K, n_in, n_out = W.shape
    out = np.zeros((K * n_in, K * n_out), dtype=W.dtype)
    for k in range(K):
        out[k * n_in : (k + 1) * n_in, k * n_out : (k + 1) * n_out] = W[k]
    return out


def build_fused_model(
    fused: FusedEnsemble,
    *,
    layout: str = DEFAULT_LAYOUT,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """input -> [Sub centre] -> wide Gemm -> activation -> the members' later layers in `layout`
    -> Softmax per member -> ReduceMean over the members -> `probabilities`; weights cast to
    float32 here. One member is written as a single model's graph."""
    if layout not in ENSEMBLE_LAYOUTS:
        raise ModelError(
            f"unknown ensemble layout {layout!r}; choose {', '.join(ENSEMBLE_LAYOUTS)}"
        )
    K = fused.size
    if K == 1:  # the mean of one softmax is the softmax: a single model's graph, nothing around it
        return build_folded_model(fused.member(0), opset=opset, metadata=metadata)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    x = INPUT_NAME
    if fused.input_center is not None:
        inits.append(_tensor(fused.input_center, "input.mean"))
        nodes.append(
            helper.make_node("Sub", [x, "input.mean"], ["input.centred"], name="input.sub")
        )
        x = "input.centred"
    widths = fused.widths()
    last = len(fused.layers) - 1

    def activate(z: str, name: str) -> str:
        out = f"{name}.out"
        nodes.append(_activation_node(fused.activation, z, out, f"{name}.act", fused.leaky_slope))
        return out

    def name_of(i: int) -> str:
        return "output" if i == last else f"hidden.{i}"

    W, b = fused.layers[0]
    first = name_of(0)
    inits += [_tensor(W, f"{first}.weight"), _tensor(b, f"{first}.bias")]
    nodes.append(
        helper.make_node(
            "Gemm",
            [x, f"{first}.weight", f"{first}.bias"],
            [f"{first}.linear"],
            name=f"{first}.gemm",
        )
    )
    x = activate(f"{first}.linear", first) if last else f"{first}.linear"
    if layout == "batched" and last > 0:
        # [batch, K*w] -> [batch, K, w] -> [K, batch, w]; Reshape's 0 keeps the batch dimension
        inits.append(_shape_const("members.shape", [0, K, widths[0]]))
        nodes.append(
            helper.make_node(
                "Reshape", [x, "members.shape"], ["members.split"], name="members.reshape"
            )
        )
        nodes.append(
            helper.make_node(
                "Transpose",
                ["members.split"],
                ["members.first"],
                name="members.transpose",
                perm=[1, 0, 2],
            )
        )
        x = "members.first"
    for i in range(1, last + 1):
        W, b = fused.layers[i]
        name = name_of(i)
        z = f"{name}.linear"
        if layout == "batched":
            inits += [_tensor(W, f"{name}.weight"), _tensor(b[:, None, :], f"{name}.bias")]
            nodes.append(
                helper.make_node(
                    "MatMul", [x, f"{name}.weight"], [f"{name}.matmul"], name=f"{name}.matmul"
                )
            )
            nodes.append(
                helper.make_node("Add", [f"{name}.matmul", f"{name}.bias"], [z], name=f"{name}.add")
            )
        else:
            inits += [
                _tensor(block_diagonal(W), f"{name}.weight"),
                _tensor(b.reshape(-1), f"{name}.bias"),
            ]
            nodes.append(
                helper.make_node(
                    "Gemm", [x, f"{name}.weight", f"{name}.bias"], [z], name=f"{name}.gemm"
                )
            )
        x = activate(z, name) if i < last else z
    member_axis = 0
    if layout == "blockdiag" or last == 0:
        # [batch, K*C] -> [batch, K, C]
        inits.append(_shape_const("members.logits_shape", [0, K, widths[-1]]))
        nodes.append(
            helper.make_node(
                "Reshape",
                [x, "members.logits_shape"],
                ["members.logits"],
                name="members.logits_reshape",
            )
        )
        x, member_axis = "members.logits", 1
    nodes.append(
        helper.make_node("Softmax", [x], ["members.probabilities"], name="members.softmax", axis=-1)
    )
    _mean_over("members.probabilities", PROBABILITIES, member_axis, opset, nodes, inits)
    doc = (
        f"bnserve ensemble of {K} MLPs with batch normalization and input standardization "
        f"folded into Gemm, side by side ({layout} layout), averaging their softmax outputs"
    )
    return _wrap(nodes, inits, fused.n_features, fused.n_classes, opset, False, doc, metadata)


def build_unfolded_ensemble(
    nets: list[FrozenMLP],
    *,
    opset: int = DEFAULT_OPSET,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """The members' unfolded graphs (`build_unfolded_model`'s nodes, named `member-k/...`) on
    the one input, each with its Softmax, and `Mean` of their probabilities: the float32 baseline
    of an ensemble's parity gate (and `convert --no-fold`)."""
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    probs = []
    for k, net in enumerate(nets):
        prefix = f"member-{k}/"
        z = _unfolded_layers(net, prefix, nodes, inits)
        probs.append(f"{prefix}{PROBABILITIES}")
        nodes.append(helper.make_node("Softmax", [z], [probs[-1]], name=f"{prefix}softmax", axis=1))
    nodes.append(helper.make_node("Mean", probs, [PROBABILITIES], name="ensemble.mean"))
    doc = (
        f"bnserve ensemble of {len(nets)} MLPs, unfolded: standardization and BatchNormalization "
        "kept, softmax outputs averaged"
    )
    return _wrap(nodes, inits, nets[0].n_features, nets[0].n_classes, opset, False, doc, metadata)


def check_model(model: onnx.ModelProto) -> None:
    """onnx's full check (including strict shape inference); a failure is a converter bug."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"the exported graph fails onnx.checker: {exc}") from exc


def serialize(model: onnx.ModelProto) -> bytes:
    # deterministic=True fixes the order of map fields, so equal models give equal bytes.
    return model.SerializeToString(deterministic=True)
