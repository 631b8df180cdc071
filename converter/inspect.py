"""Describe any ONNX file: inputs and outputs with shapes, operator histogram, opsets, metadata,
and bnserve's fold and parity reports in readable form. Foreign models have no bnserve metadata;
the description says so instead of failing.

`describe_model` returns plain JSON-able data (for `--json` and for other commands' reports),
`format_description` renders it for people.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from bnserve.errors import ModelError

JSON_KEYS = (
    "bnserve.ensemble",
    "bnserve.labels",
    "bnserve.feature_names",
    "bnserve.fold_report",
    "bnserve.parity_report",
    "bnserve.preprocessing",
    "bnserve.profile",
)


def load_model(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Read an ONNX file without its external data (not needed to describe it)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if path.is_dir():
        raise ModelError(f"{path}: is a directory, expected an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, OSError, RuntimeWarning) as exc:
        raise ModelError(f"{path}: not a readable ONNX model ({exc})") from exc
    # Protobuf parses many byte strings (even an empty file) as a message with no fields.
    if model.ir_version == 0 or not model.HasField("graph"):
        raise ModelError(f"{path}: not an ONNX model (no IR version or graph)")
    return model


def _value_info(v: onnx.ValueInfoProto) -> dict[str, Any]:
    t = v.type
    if not t.HasField("tensor_type"):
        return {"name": v.name, "type": t.WhichOneof("value") or "unknown", "shape": None}
    tt = t.tensor_type
    try:
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))  # "float32", not "float"
    except (KeyError, ValueError, TypeError):
        dtype = onnx.TensorProto.DataType.Name(tt.elem_type).lower() if tt.elem_type else "unknown"
    shape: list[Any] | None = None
    if tt.HasField("shape"):
        shape = [
            d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in tt.shape.dim
        ]
    return {"name": v.name, "type": dtype, "shape": shape}


def describe_model(model: onnx.ModelProto) -> dict[str, Any]:
    """A JSON-able description of `model`."""
    g = model.graph
    ops = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in g.node
    )
    init_names = {t.name for t in g.initializer}
    n_params = 0
    for t in g.initializer:
        size = 1
        for d in t.dims:
            size *= d
        n_params += size
    metadata = {p.key: p.value for p in model.metadata_props}
    bnserve: dict[str, Any] | None = None
    if any(k.startswith("bnserve.") for k in metadata):
        bnserve = {}
        for key, value in metadata.items():
            if not key.startswith("bnserve."):
                continue
            short = key.removeprefix("bnserve.")
            if key in JSON_KEYS and value:
                try:
                    bnserve[short] = json.loads(value)
                except json.JSONDecodeError:
                    bnserve[short] = value  # shown raw: inspect must not fail on a bad value
            else:
                bnserve[short] = value
    return {
        "ir_version": int(model.ir_version),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": {(o.domain or "ai.onnx"): int(o.version) for o in model.opset_import},
        "graph_name": g.name,
        "inputs": [_value_info(v) for v in g.input if v.name not in init_names],
        "outputs": [_value_info(v) for v in g.output],
        "nodes": len(g.node),
        "operators": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "initializers": len(g.initializer),
        "parameters": n_params,
        "metadata": metadata,
        "bnserve": bnserve,
    }


def _shape(shape: list[Any] | None) -> str:
    return "?" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def _g(x: Any) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def describe_standardization(std: dict[str, Any]) -> str:
    """Where a `bnserve convert` fold report's standardization went, and for a folded model whether
    the input was kept centred and why (the float32 errors measured for both candidates)."""
    into = std.get("folded_into") or "kept as Sub/Div"
    centred = ", input kept centred (Sub of the means first)" if std.get("centred") else ""
    ratio = ""
    if "max_abs_mean_over_std" in std:
        ratio = f", max |mean|/std {_g(std.get('max_abs_mean_over_std'))}"
    line = (
        f"standardization -> {into}{centred} (max |1/std| {_g(std.get('max_abs_inv_std'))}{ratio})"
    )
    return f"{line}; {std['decision']}" if std.get("decision") else line


def describe_ensemble(ensemble: dict[str, Any]) -> str:
    """An ensemble fold report's summary: members, layout, how their outputs combine."""
    layout = f", {ensemble['layout']} layout" if ensemble.get("layout") else ""
    return f"ensemble of {ensemble.get('members')} members{layout}: {ensemble.get('combine')}"


def describe_allowance(report: dict[str, Any]) -> str:
    """The gate's allowance for one output and what it is made of: `X = atol A (...)` or
    `X = 4 x float32 noise floor F, set by RUN (float32 runs: ...)`. Reports written before the
    breakdown existed give `X (atol A)`."""
    tol, atol, floor = (
        report.get("tolerance"),
        report.get("atol"),
        report.get("float32_noise_floor"),
    )
    runs = report.get("float32_runs")
    factor = report.get("noise_factor")
    if not isinstance(runs, list) or factor is None:
        return f"{_g(tol)} (atol {_g(atol)})"
    listed = "; ".join(
        f"{r.get('run')} {_g(r.get('max_abs_diff'))}" for r in runs if isinstance(r, dict)
    )
    if report.get("tolerance_source") == "atol":
        return (
            f"{_g(tol)} = atol {_g(atol)} (above {_g(factor)} x float32 noise floor {_g(floor)}; "
            f"float32 runs: {listed})"
        )
    return (
        f"{_g(tol)} = {_g(factor)} x float32 noise floor {_g(floor)}, set by "
        f"{report.get('noise_floor_source')} (float32 runs: {listed})"
    )


def _foreign_fold_lines(report: dict[str, Any]) -> list[str]:
    """The report of `bnserve fold` (a model exported by another framework)."""
    bns = report.get("batchnorms", [])
    folded = sum(b.get("status") == "folded" for b in bns)
    lines = [
        f"  fold report (bnserve fold): {folded} of {len(bns)} BatchNormalization folded; "
        f"{report.get('nodes_before')} -> {report.get('nodes_after')} nodes, "
        f"{report.get('initializers_before')} -> {report.get('initializers_after')} initializers"
    ]
    for b in [*bns, *report.get("affine_ops", [])]:
        what = f"{b.get('status')} {b.get('how', '')} {b.get('into', '')!r}"
        if b.get("status") != "folded":
            what = f"{b.get('status')}: {b.get('reason')}"
        stats = ""
        if "min_var" in b:
            stats = f"; eps {_g(b.get('epsilon'))}, min var {_g(b.get('min_var'))}, max |s| {_g(b.get('max_abs_s'))}"
        flag = "  WARNING: large scale" if b.get("large_scale") else ""
        lines.append(
            f"    {b.get('node')} ({b.get('op', 'BatchNormalization')}): {what}{stats}{flag}"
        )
    lines += [f"    warning: {w}" for w in report.get("warnings", [])]
    return lines


def _ensemble_lines(ensemble: dict[str, Any]) -> list[str]:
    """The `bnserve.ensemble` metadata: how many members, bagged or not, and each member."""
    members = ensemble.get("members") or []
    bagging = "bagging" if ensemble.get("bagging") else "no bagging"
    lines = [
        f"  ensemble: {ensemble.get('size')} members ({bagging}), {ensemble.get('layout')} layout"
    ]
    for m in members:
        if isinstance(m, dict):
            sha = str(m.get("checkpoint_sha256", ""))[:12]
            lines.append(
                f"    member {m.get('index')}: seed {m.get('seed')}, {m.get('stats')} statistics, "
                f"checkpoint sha256 {sha}..."
            )
    return lines


def _fold_lines(report: Any) -> list[str]:
    if not isinstance(report, dict):
        return [f"  fold report: {report}"]
    if report.get("kind") == "foreign":
        return _foreign_fold_lines(report)
    lines = [
        f"  fold report: {'folded' if report.get('folded') else 'not folded (--no-fold)'}, "
        f"BN placement {report.get('placement')}, activation {report.get('activation')}"
    ]
    if isinstance(report.get("ensemble"), dict):
        lines.append(f"    {describe_ensemble(report['ensemble'])}")
    std = report.get("standardization") or {}
    if std:
        lines.append(f"    {describe_standardization(std)}")
    for r in report.get("bn_layers", []):
        into = f" {r['folded_into']}" if r.get("folded_into") else ""
        flag = "  WARNING: large scale" if r.get("large_scale") else ""
        lines.append(
            f"    {r.get('layer')} (BN {r.get('placement')}): {r.get('direction')}{into}; "
            f"eps {_g(r.get('eps'))}, min var {_g(r.get('min_var'))}, max |s| {_g(r.get('max_abs_s'))}{flag}"
        )
    lines += [f"    warning: {w}" for w in report.get("warnings", [])]
    return lines


def _parity_lines(report: Any) -> list[str]:
    if not isinstance(report, dict):
        return [f"  parity report: {report or 'none'}"]
    levels = ", ".join(
        f"{k} {_g(v)}" for k, v in (report.get("max_abs_diff_by_level") or {}).items()
    )
    # bnserve fold compares with the input model in onnxruntime, convert with float64 numpy.
    foreign = str(report.get("reference", "")).startswith("input model")
    diff = "max |diff| vs input model" if foreign else "max |p - p_float64|"
    floor = "input model float32" if foreign else "unfolded float32"
    lines = [
        f"  parity report: {'passed' if report.get('passed') else 'FAILED'} on {report.get('probes')} probes",
        f"    {diff} {_g(report.get('max_abs_diff'))} ({levels}); "
        f"{floor} {_g(report.get('unfolded_float32_max_abs_diff'))}; "
        f"allowed {describe_allowance(report)}",
        f"    argmax agreement {report.get('argmax_agreement', 0) * 100:.2f}% "
        f"({report.get('near_ties')} near ties)",
    ]
    if isinstance(report.get("logits"), dict):
        lg = report["logits"]
        lines.append(
            f"    logits: max |diff| {_g(lg.get('max_abs_diff'))}, unfolded float32 "
            f"{_g(lg.get('unfolded_float32_max_abs_diff'))}, allowed {_g(lg.get('tolerance'))}"
        )
    return lines


def _profile_lines(profile: dict[str, Any], limit: int = 12) -> list[str]:
    """The training profile: each input's range and median, or its categories."""
    inputs = profile.get("inputs") or []
    lines = [f"  training profile ({len(inputs)} inputs):"]
    for entry in inputs[:limit]:
        if entry.get("kind") == "categorical":
            freq = entry.get("frequencies") or {}
            shown = ", ".join(f"{c} {f:.0%}" for c, f in list(freq.items())[:6])
            lines.append(f"    {entry.get('name')}: categories {shown}")
        elif "min" in entry:
            q = entry.get("quantiles") or []
            median = q[len(q) // 2] if q else None
            lines.append(
                f"    {entry.get('name')}: n {entry.get('count')}, range [{_g(entry['min'])}, "
                f"{_g(entry['max'])}], mean {_g(entry.get('mean'))}, median {_g(median)}"
            )
    if len(inputs) > limit:
        lines.append(f"    ... ({len(inputs) - limit} more)")
    return lines


def format_description(desc: dict[str, Any], title: str = "") -> str:
    """Human-readable rendering of `describe_model`'s result."""
    opsets = ", ".join(f"{d} {v}" for d, v in desc["opset"].items())
    lines = [
        f"{title or desc['graph_name']}: ONNX IR {desc['ir_version']}, opset {opsets}, "
        f"producer {desc['producer'] or 'unknown'}",
        "inputs:",
        *[f"  {v['name']}: {v['type']} {_shape(v['shape'])}" for v in desc["inputs"]],
        "outputs:",
        *[f"  {v['name']}: {v['type']} {_shape(v['shape'])}" for v in desc["outputs"]],
        f"operators ({desc['nodes']} nodes): "
        + (", ".join(f"{op} x{n}" for op, n in desc["operators"].items()) or "none"),
        f"initializers: {desc['initializers']} ({desc['parameters']:,} parameters)",
    ]
    b = desc["bnserve"]
    if b is None:
        lines.append("bnserve metadata: none (not written by bnserve convert)")
    else:
        lines.append("bnserve metadata:")
        for key in (
            "format_version",
            "output_kind",
            "stats",
            "converter_version",
            "source_sha256",
            "data_fingerprint",
            "fold_source_sha256",
        ):
            if key in b:
                lines.append(f"  {key}: {b[key] or '-'}")
        for key in ("labels", "feature_names"):
            if key in b:
                v = b[key]
                shown = (
                    ", ".join(map(str, v[:20]))
                    + (f", ... ({len(v)} in all)" if len(v) > 20 else "")
                    if isinstance(v, list)
                    else str(v)
                )
                lines.append(f"  {key}: {shown}")
        if isinstance(b.get("ensemble"), dict):
            lines += _ensemble_lines(b["ensemble"])
        if "fold_report" in b:
            lines += _fold_lines(b["fold_report"])
        if "parity_report" in b:
            lines += _parity_lines(b["parity_report"])
        if isinstance(b.get("profile"), dict):
            lines += _profile_lines(b["profile"])
    other = {k: v for k, v in desc["metadata"].items() if not k.startswith("bnserve.")}
    if other:
        lines.append("other metadata:")
        lines += [f"  {k}: {v if len(v) <= 200 else v[:200] + '...'}" for k, v in other.items()]
    return "\n".join(lines)
