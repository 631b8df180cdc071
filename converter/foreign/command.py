"""`bnserve fold`: load, refuse, fold, gate, write atomically, report."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from bnserve import __version__
from bnserve.atomic import atomic_path, check_output_path, write_text_atomic
from bnserve.converter import export, verify
from bnserve.converter.foreign.checks import fold_model, refuse_unsafe
from bnserve.converter.foreign.gate import fold_reference, load_foreign_model, probe_inputs
from bnserve.converter.foreign.profile import training_profile
from bnserve.errors import ModelError, ParityError, UsageError


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
    atol: float = verify.DEFAULT_ATOL,
    probe: str | os.PathLike[str] | None = None,
    report_path: str | os.PathLike[str] | None = None,
    warn: Callable[[str], None] | None = None,
    profile: str | None = None,
    profile_label: str | None = None,
) -> FoldResult:
    """Fold, verify and write; raise a BnserveError (no model file written) on any refusal.
    With `profile` (training data or a profile .json, converter/foreign/profile.py) the model
    also carries the training profile and the feature names it names.

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
    described = (
        {} if profile is None else _profile_metadata(original, profile, profile_label, X.shape[1])
    )
    # refuse a model onnxruntime cannot run before any work
    verify.run_checked(export.serialize(original), X[:1], "disabled", "input model")
    folded, report = fold_model(original)
    for w in report["warnings"]:
        if warn is not None:
            warn(w)
    metadata = {
        "bnserve.fold_report": export.to_json(report),
        "bnserve.parity_report": "",
        "bnserve.fold_source_sha256": hashlib.sha256(Path(input_path).read_bytes()).hexdigest(),
        "bnserve.converter_version": __version__,
        **described,
    }
    _set_metadata(folded, metadata)
    try:
        onnx.checker.check_model(folded)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"the folded graph fails onnx.checker (a bnserve bug): {exc}") from exc
    with atomic_path(output) as tmp:
        tmp.write_bytes(export.serialize(folded))
        result = verify.parity_gate(tmp, X, fold_reference(original, folded, X, warn), atol)
        result.report["probe_source"] = str(probe) if probe is not None else "random"
        if not result.passed:
            if report_path is not None:
                write_text_atomic(report_path, _report_json(report, result.report))
            raise ParityError(result.message)
        _set_metadata(folded, {"bnserve.parity_report": export.to_json(result.report)})
        tmp.write_bytes(export.serialize(folded))
        # The report first: if it cannot be written, the model is not renamed into place either.
        if report_path is not None:
            write_text_atomic(report_path, _report_json(report, result.report))
    return FoldResult(output, report, result.report)


def _profile_metadata(
    model: onnx.ModelProto, source: str, label: str | None, n_features: int
) -> dict[str, str]:
    """`bnserve.profile` and `bnserve.feature_names` from --profile; names the model already
    declares must be the profile's."""
    profile, names = training_profile(source, label, n_features)
    declared = {p.key: p.value for p in model.metadata_props}.get("bnserve.feature_names")
    if declared and json.loads(declared) != names:
        raise UsageError(
            f"--profile {source} names the features {names}, the model {json.loads(declared)}"
        )
    return {
        "bnserve.profile": export.to_json(profile),
        "bnserve.feature_names": json.dumps(names, ensure_ascii=False),
    }


def _report_json(fold_report: dict[str, Any], parity: dict[str, Any]) -> str:
    return json.dumps({"fold": fold_report, "parity": parity}, indent=2, sort_keys=True) + "\n"
