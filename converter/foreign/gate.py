"""The parity gate of `bnserve fold`: the folded file against the input model in float64."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from bnserve.converter import export, verify
from bnserve.converter.foreign.checks import fold_model
from bnserve.converter.foreign.graph import FLOAT_TYPES, Array
from bnserve.converter.inspect import load_model
from bnserve.errors import ModelError, ParityError, UsageError


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
    if len(dims) != 2 or dims[1] is None or dtype.type not in FLOAT_TYPES:
        raise ModelError(
            f"input {v.name!r} is not a float [batch, F] tensor with a known F ({dims}); "
            "give probe rows with --probe FILE.npy"
        )
    F = int(dims[1])
    return verify.make_probes(np.zeros(F), np.ones(F)).astype(dtype)


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
        worst = max(
            worst, verify.max_abs_error(verify.as_rows(out[name]), verify.as_rows(value))[0] / scale
        )
    if not worst <= verify.FOLD_FLOAT64_TOLERANCE:
        raise ParityError(
            f"parity gate failed: the fold differs from the input model by {worst:.3g} (relative) "
            f"in float64 (allowed {verify.FOLD_FLOAT64_TOLERANCE:.0e}): a bnserve bug"
        )
    return worst


def fold_reference(
    original: onnx.ModelProto,
    folded: onnx.ModelProto,
    X: Array,
    warn: Callable[[str], None] | None = None,
) -> verify.Reference:
    """What the folded file is judged against (verify.parity_gate): the input model run in float64,
    in onnxruntime, else in onnx's reference evaluator; only when neither can run it is the
    float32 input model the reference, and `warn` and the report say so.

    The noise floor's float32 evaluations: the input model in onnxruntime at both optimization
    levels, and the folded float32 weights evaluated in float64 (admissible because the fold
    itself is first checked in float64)."""
    original_bytes = export.serialize(original)
    ref32 = verify.run_checked(original_bytes, X, "disabled", "input model")
    optimized = verify.run_checked(original_bytes, X, "all", "input model")
    ref64, engine = _float64_outputs(original, X, warn)
    if ref64 is None:
        return verify.Reference(
            ref32, [optimized], f"input model in onnxruntime, float32: {engine}", float64=False
        )
    fold_check = _check_fold_float64(original, X, ref64)
    return verify.Reference(
        ref64,
        [ref32, optimized, _float64_outputs(folded, X)[0] or ref32],
        f"input model in {engine}, float64",
        fold_check={"fold_float64_max_rel_diff": fold_check},
    )
