"""What the service needs to know about an ONNX classifier, read from the file alone.

Pure functions over the ONNX protobuf (no onnxruntime), so the same reading serves the workers,
the start-up probe and `bnserve predict`. Models written by our converter carry labels, feature
names and reports in `metadata_props`; any other classifier gets sensible defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bnserve.errors import ModelError
from bnserve.service.columns import RawColumn, read_columns
from bnserve.service.config import OUTPUT_KINDS
from bnserve.service.profile import Profile, read_profile

#: The newest `bnserve.format_version` this service understands.
SUPPORTED_FORMAT_VERSION = 1

# ONNX element type -> numpy dtype, for the input and the class scores of a classifier.
_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32),
    onnx.TensorProto.DOUBLE: np.dtype(np.float64),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16),
}
# A raw-column model's inputs may also be strings (service/columns.py).
_INPUT_TYPES = {**_ONNX_TO_NUMPY, onnx.TensorProto.STRING: np.dtype(object)}
# Other outputs a classifier may have next to its scores (a predicted label, as sklearn-onnx
# writes): returned by the V2 API as they are, never used as scores.
_OTHER_OUTPUTS = {
    **_ONNX_TO_NUMPY,
    onnx.TensorProto.INT8: np.dtype(np.int8),
    onnx.TensorProto.INT16: np.dtype(np.int16),
    onnx.TensorProto.INT32: np.dtype(np.int32),
    onnx.TensorProto.INT64: np.dtype(np.int64),
    onnx.TensorProto.UINT8: np.dtype(np.uint8),
    onnx.TensorProto.UINT16: np.dtype(np.uint16),
    onnx.TensorProto.UINT32: np.dtype(np.uint32),
    onnx.TensorProto.UINT64: np.dtype(np.uint64),
    onnx.TensorProto.BOOL: np.dtype(np.bool_),
    onnx.TensorProto.STRING: np.dtype(object),
}


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, numpy dtype and shape (None for a symbolic dimension)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]


@dataclass(frozen=True)
class ModelInfo:
    """The classifier's interface and metadata, as the HTTP layers and the CLI use them."""

    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    score_output: str
    output_kind: str  # "probabilities" or "logits"
    labels: tuple[Any, ...] | None
    feature_names: tuple[str, ...] | None
    metadata: dict[str, str] = field(default_factory=dict)
    # A model with one input per raw table column (service/columns.py); `input` then stands for
    # all of them: no name, width = the number of columns, `feature_names` = the column names.
    columns: tuple[RawColumn, ...] | None = None
    profile: Profile | None = None  # the training inputs (service/profile.py), when written

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the graph was exported with, when it is not symbolic (else None)."""
        return self.input.shape[0]

    @property
    def n_features(self) -> int:
        """Number of input columns F."""
        assert self.input.shape[1] is not None
        return self.input.shape[1]

    def reports(self) -> dict[str, Any]:
        """The converter's fold and parity reports (and provenance), parsed, when present."""
        out: dict[str, Any] = {}
        for key in ("fold_report", "parity_report", "stats", "profile"):
            raw = self.metadata.get(f"bnserve.{key}")
            if raw is not None:
                try:
                    out[key] = json.loads(raw)
                except ValueError:
                    out[key] = raw
        for key in ("source_sha256", "data_fingerprint", "converter_version", "format_version"):
            if f"bnserve.{key}" in self.metadata:
                out[key] = self.metadata[f"bnserve.{key}"]
        return out


def load_info(path: Path, output_kind: str = "auto") -> ModelInfo:
    """Read `path` without its external weights and describe it (see `describe`)."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for truncated or foreign files
        raise ModelError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})"
        ) from exc
    return describe(model, output_kind, where=str(path))


def describe(model: onnx.ModelProto, output_kind: str = "auto", where: str = "model") -> ModelInfo:
    """Check that `model` is a classifier the service can serve and describe its interface.

    Refuses (ModelError, with the reason) a newer `bnserve.format_version`, anything but one
    float input `[batch, F]`, and several outputs of which none is named `probabilities`.
    """
    if output_kind not in OUTPUT_KINDS:
        raise ModelError(
            f"output kind must be one of {', '.join(OUTPUT_KINDS)}, got {output_kind!r}"
        )
    metadata = {p.key: p.value for p in model.metadata_props}
    _check_format_version(metadata, where)

    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [
        _tensor_spec(v, where, _INPUT_TYPES) for v in graph.input if v.name not in initializers
    ]
    columns = read_columns(metadata, inputs, where)
    if columns is not None:
        feature_names: list[Any] | None = [c.name for c in columns]
        the_input = TensorSpec("", np.dtype(np.float32), (None, len(columns)))
    elif len(inputs) != 1:
        names = ", ".join(repr(i.name) for i in inputs)
        raise ModelError(
            f"{where}: expected one input [batch, F], the graph has {len(inputs)}: {names}"
        )
    elif inputs[0].dtype.kind != "f":
        raise ModelError(
            f"{where}: input {inputs[0].name!r} holds {inputs[0].dtype}; expected float "
            "[batch, F] (or the raw columns bnserve convert describes in bnserve.preprocessing)"
        )
    else:
        feature_names = _json_list(metadata, "bnserve.feature_names", where)
        the_input = _check_input(inputs[0], feature_names, where)

    outputs = tuple(_tensor_spec(v, where, _OTHER_OUTPUTS) for v in graph.output)
    names = [o.name for o in outputs]
    scores = [o.name for o in outputs if o.dtype.kind == "f" and len(o.shape) == 2]
    if "probabilities" in names:
        score_output = "probabilities"
    elif len(outputs) == 1:
        score_output = outputs[0].name
    elif len(scores) == 1:  # e.g. sklearn-onnx: an int64 label and one float [N, C] output
        score_output = scores[0]
    else:
        raise ModelError(
            f"{where}: cannot tell which output holds the class scores: none of {names} "
            "is named 'probabilities'"
        )
    score_spec = outputs[names.index(score_output)]
    if score_spec.dtype.kind != "f":
        raise ModelError(
            f"{where}: output {score_output!r} has element type {score_spec.dtype}; "
            "class scores must be float"
        )
    if len(score_spec.shape) != 2:
        raise ModelError(f"{where}: output {score_output!r} must be [batch, classes]")

    labels = _json_list(metadata, "bnserve.labels", where)
    if labels is not None and score_spec.shape[1] not in (None, len(labels)):
        raise ModelError(
            f"{where}: {len(labels)} labels in bnserve.labels but output {score_output!r} "
            f"has {score_spec.shape[1]} classes"
        )
    return ModelInfo(
        input=the_input,
        outputs=outputs,
        score_output=score_output,
        output_kind=_output_kind(output_kind, metadata, graph, score_output),
        labels=tuple(labels) if labels is not None else None,
        feature_names=tuple(str(n) for n in feature_names) if feature_names is not None else None,
        metadata=metadata,
        columns=columns,
        profile=read_profile(
            metadata, tuple(str(n) for n in feature_names) if feature_names else None, columns
        ),
    )


def _check_format_version(metadata: dict[str, str], where: str) -> None:
    raw = metadata.get("bnserve.format_version")
    if raw is None:
        return
    try:
        version = int(raw)
    except ValueError:
        raise ModelError(f"{where}: bnserve.format_version {raw!r} is not an integer") from None
    if version > SUPPORTED_FORMAT_VERSION:
        raise ModelError(
            f"{where}: model format version {version} is newer than this service understands "
            f"(up to {SUPPORTED_FORMAT_VERSION}); upgrade bnserve to serve it"
        )


def _tensor_spec(
    value: onnx.ValueInfoProto, where: str, types: dict[int, np.dtype] = _ONNX_TO_NUMPY
) -> TensorSpec:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise ModelError(
            f"{where}: {value.name!r} is not a tensor (sequences and maps are not served)"
        )
    dtype = types.get(tensor_type.elem_type)
    if dtype is None:
        type_name = onnx.TensorProto.DataType.Name(tensor_type.elem_type)
        raise ModelError(
            f"{where}: {value.name!r} has element type {type_name}; served here: "
            + ", ".join(onnx.TensorProto.DataType.Name(t) for t in types)
        )
    shape = tuple(
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in tensor_type.shape.dim
    )
    return TensorSpec(value.name, dtype, shape)


def _check_input(spec: TensorSpec, feature_names: list[Any] | None, where: str) -> TensorSpec:
    if len(spec.shape) != 2:
        raise ModelError(
            f"{where}: input {spec.name!r} must be [batch, F], it has rank {len(spec.shape)}"
        )
    n_features = spec.shape[1]
    if n_features is None and feature_names is not None:
        n_features = len(feature_names)
    if n_features is None:
        raise ModelError(f"{where}: input {spec.name!r} has no fixed number of features")
    if feature_names is not None and len(feature_names) != n_features:
        raise ModelError(
            f"{where}: {len(feature_names)} names in bnserve.feature_names for {n_features} features"
        )
    return TensorSpec(spec.name, spec.dtype, (spec.shape[0], n_features))


def _json_list(metadata: dict[str, str], key: str, where: str) -> list[Any] | None:
    raw = metadata.get(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        raise ModelError(f"{where}: {key} is not valid JSON") from None
    if not isinstance(value, list):
        raise ModelError(f"{where}: {key} must be a JSON list")
    return value


def _output_kind(
    requested: str, metadata: dict[str, str], graph: onnx.GraphProto, score: str
) -> str:
    """`--output-kind` wins, then `bnserve.output_kind`, then whether the graph ends in Softmax."""
    if requested != "auto":
        return requested
    declared = metadata.get("bnserve.output_kind")
    if declared in ("probabilities", "logits"):
        return declared
    producer = next((n for n in graph.node if score in n.output), None)
    return "probabilities" if producer is not None and producer.op_type == "Softmax" else "logits"
