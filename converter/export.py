"""Build the ONNX graphs with `onnx.helper`: the folded one (Gemm, activation, Softmax only, behind
one Sub of the input means where the converter keeps the input centred) and the unfolded
reference (Sub/Div standardization, Gemm, BatchNormalization with its epsilon).

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


def _finish(
    nodes: list[onnx.NodeProto],
    initializers: list[TensorProto],
    last: str,
    n_features: int,
    n_classes: int,
    *,
    opset: int,
    logits: bool,
    doc: str,
    metadata: dict[str, str] | None,
) -> onnx.ModelProto:
    """Add the output head (logits -> Softmax), wrap in a graph and a model."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ModelError(f"opset {opset} is not supported; choose {MIN_OPSET} to {MAX_OPSET}")
    if last != LOGITS:  # the last Gemm writes the logits tensor directly
        raise AssertionError("the output layer must write the 'logits' tensor")
    nodes.append(helper.make_node("Softmax", [LOGITS], [PROBABILITIES], name="softmax", axis=1))
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
    return _finish(
        nodes,
        inits,
        x,
        n_features,
        n_classes,
        opset=opset,
        logits=logits,
        metadata=metadata,
        doc=doc,
    )


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
    inits = [_tensor(net.input_mean, "input.mean"), _tensor(net.input_std, "input.std")]
    nodes.append(
        helper.make_node("Sub", [INPUT_NAME, "input.mean"], ["input.centered"], name="input.sub")
    )
    nodes.append(
        helper.make_node(
            "Div", ["input.centered", "input.std"], ["input.standardized"], name="input.div"
        )
    )
    x = "input.standardized"

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
        name = f"hidden.{i}"
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
    inits += [_tensor(net.output_W, "output.weight"), _tensor(net.output_b, "output.bias")]
    nodes.append(
        helper.make_node("Gemm", [x, "output.weight", "output.bias"], [LOGITS], name="output.gemm")
    )
    return _finish(
        nodes,
        inits,
        LOGITS,
        net.n_features,
        net.n_classes,
        opset=opset,
        logits=logits,
        metadata=metadata,
        doc="bnserve MLP, unfolded: standardization and BatchNormalization kept",
    )


def check_model(model: onnx.ModelProto) -> None:
    """onnx's full check (including strict shape inference); a failure is a converter bug."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"the exported graph fails onnx.checker: {exc}") from exc


def serialize(model: onnx.ModelProto) -> bytes:
    # deterministic=True fixes the order of map fields, so equal models give equal bytes.
    return model.SerializeToString(deterministic=True)
