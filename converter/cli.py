"""`bnserve convert`, `bnserve fold` and `bnserve inspect`: argument parsing and printing only; the
work is in `converter.convert`, `converter.foreign` and `converter.inspect`. Errors are raised as BnserveError subclasses and the
dispatcher (bnserve/cli.py) turns them into `bnserve CMD: error: ...` and the exit code."""

from __future__ import annotations

import argparse
import json
import sys

from bnserve.converter import export, verify
from bnserve.errors import UsageError


def _convert_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnserve convert",
        description="Fold BN and the input standardization into the linear layers of a checkpoint, "
        "export ONNX, and write it only after it matches the float64 reference.",
    )
    p.add_argument(
        "checkpoint",
        help="checkpoint .npz written by bnserve train, or an ensemble: the ensemble.json of "
        "bnserve train --ensemble K (or its folder), written as one graph",
    )
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument(
        "--opset",
        type=int,
        default=export.DEFAULT_OPSET,
        help=f"ONNX opset, {export.MIN_OPSET} to {export.MAX_OPSET} (default {export.DEFAULT_OPSET})",
    )
    p.add_argument(
        "--no-fold",
        action="store_true",
        help="export the unfolded graph (Sub/Div, Gemm, BatchNormalization) as a reference",
    )
    p.add_argument(
        "--stats",
        choices=("running", "population"),
        help="frozen BN statistics to use (default: the checkpoint's default)",
    )
    p.add_argument(
        "--atol",
        type=float,
        default=verify.DEFAULT_ATOL,
        help=f"parity tolerance on probabilities (default {verify.DEFAULT_ATOL:g})",
    )
    p.add_argument("--logits", action="store_true", help="add a second output 'logits'")
    p.add_argument(
        "--layout",
        choices=export.ENSEMBLE_LAYOUTS,
        default=export.DEFAULT_LAYOUT,
        help="ensemble only: the members' layers after the first as one batched MatMul over "
        "[K, batch, width] or as block-diagonal Gemm weights (default "
        f"{export.DEFAULT_LAYOUT}, the faster here)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def convert_main(argv: list[str]) -> int:
    args = _convert_parser().parse_args(argv)
    from bnserve.converter.convert import convert_checkpoint
    from bnserve.models.ensemble import is_ensemble

    def warn(msg: str) -> None:
        print(f"bnserve convert: warning: {msg}", file=sys.stderr)

    common = {"opset": args.opset, "fold": not args.no_fold, "stats": args.stats}
    if is_ensemble(args.checkpoint):
        from bnserve.converter.ensemble import convert_ensemble

        if args.logits:
            raise UsageError(
                "an ensemble averages its members' probabilities; it has no logits to output "
                "(drop --logits)"
            )
        result = convert_ensemble(
            args.checkpoint, args.output, **common, atol=args.atol, layout=args.layout, warn=warn
        )
    else:
        result = convert_checkpoint(
            args.checkpoint, args.output, **common, atol=args.atol, logits=args.logits, warn=warn
        )
    if not args.quiet:
        from bnserve.converter.inspect import (
            describe_allowance,
            describe_ensemble,
            describe_standardization,
        )

        pr = result.parity_report
        ops = ", ".join(f"{op} x{n}" for op, n in result.op_counts.items())
        print(
            f"wrote {result.path} ({'folded' if result.folded else 'unfolded'}, opset {result.opset}, "
            f"{result.stats} statistics; {ops})\n"
            f"{describe_standardization(result.fold_report['standardization'])}\n"
            f"parity on {pr['probes']} probes: max |p - p_float64| {pr['max_abs_diff']:.3g} "
            f"(unfolded float32 {pr['unfolded_float32_max_abs_diff']:.3g}), "
            f"argmax agreement {pr['argmax_agreement'] * 100:.2f}%\n"
            f"allowed {describe_allowance(pr)}"
        )
        ensemble = result.fold_report.get("ensemble")
        if ensemble:
            print(describe_ensemble(ensemble))
    return 0


def _fold_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnserve fold",
        description="Fold BatchNormalization (and constant input standardization) into the linear "
        "layers of an ONNX model exported by another framework (e.g. torch.onnx.export), and "
        "write it only after it matches the original model in onnxruntime.",
    )
    p.add_argument("model", help="ONNX file to fold")
    p.add_argument("-o", "--output", required=True, help="ONNX file to write")
    p.add_argument("--report", help="also write the fold and parity report to this JSON file")
    p.add_argument(
        "--atol",
        type=float,
        default=verify.DEFAULT_ATOL,
        help="parity tolerance, relative to max(1, largest |output|) "
        f"(default {verify.DEFAULT_ATOL:g})",
    )
    p.add_argument(
        "--probe",
        help="probe inputs (.npy, shaped like the model input) instead of seeded random rows",
    )
    p.add_argument(
        "--profile",
        metavar="DATA",
        help="the training data (CSV, Parquet, .npz or sklearn:NAME: its feature columns in the "
        "model's input order) or a profile .json: stored as the model's training profile, so "
        "bnserve serve flags out-of-range inputs and measures drift",
    )
    p.add_argument(
        "--label",
        help="with --profile DATA: the label column, left out of the profile (default: the last)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    return p


def fold_main(argv: list[str]) -> int:
    args = _fold_parser().parse_args(argv)
    from bnserve.converter.foreign import fold_onnx_file

    def warn(msg: str) -> None:
        print(f"bnserve fold: warning: {msg}", file=sys.stderr)

    result = fold_onnx_file(
        args.model,
        args.output,
        atol=args.atol,
        probe=args.probe,
        report_path=args.report,
        warn=warn,
        profile=args.profile,
        profile_label=args.label,
    )
    if not args.quiet:
        rep, pr = result.fold_report, result.parity_report
        folded = sum(b["status"] == "folded" for b in rep["batchnorms"])
        print(
            f"wrote {result.path}: {folded} of {len(rep['batchnorms'])} BatchNormalization folded, "
            f"{rep['nodes_before']} -> {rep['nodes_after']} nodes\n"
            f"parity on {pr['probes']} probes vs the input model: max |diff| "
            f"{pr['max_abs_diff']:.3g} (allowed {pr['tolerance']:.3g}), "
            f"argmax agreement {pr['argmax_agreement'] * 100:.2f}%\n"
            f"reference: {pr['reference']}"
        )
        for b in rep["batchnorms"]:
            if b["status"] != "folded":
                print(f"  kept {b['node']!r}: {b.get('reason')}")
    return 0


def inspect_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="bnserve inspect",
        description="Show an ONNX model's inputs, outputs, operators, opset and metadata.",
    )
    p.add_argument("model", help="any ONNX file")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    args = p.parse_args(argv)
    from bnserve.converter.inspect import describe_model, format_description, load_model

    desc = describe_model(load_model(args.model))
    if args.json:
        print(json.dumps(desc, indent=2, sort_keys=True, ensure_ascii=False))
    else:
        print(format_description(desc, title=args.model))
    return 0
