"""`bnserve train` (and later the study commands): parse options, run, write files. No math here."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from bnserve.atomic import check_output_dir, check_output_path, write_text_atomic
from bnserve.errors import BnserveError, UsageError, require_extra
from bnserve.models.network import PLACEMENTS
from bnserve.models.options import add_options, int_list
from bnserve.models.train import DTYPES, TrainConfig


class TrainingDiverged(BnserveError):
    exit_code = 1


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 2, one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see 'bnserve {self.prog.split()[-1]} --help')")


#: The options of `bnserve train` before its held-out group (see models/options.py).
TRAIN_OPTIONS = (
    "hidden", "activation", "bn", "optimizer", "lr", "beta1", "beta2", "momentum", "weight_decay",
    "lr_schedule", "lr_decay", "batch_size", "epochs", "dropout", "bn_momentum", "bn_eps",
    "population_stats", "bagging",
)  # fmt: skip


#: How a CSV's columns are chosen and read (models/tabular.py).
COLUMN_OPTIONS = (
    "drop", "features", "keep_id", "categorical", "missing_values", "min_frequency",
)  # fmt: skip


def train_parser() -> argparse.ArgumentParser:
    # Every option defaults to None so that a --config file can fill what the command line omits.
    p = _Parser(prog="bnserve train", description="Train a batch-normalized MLP in numpy.")
    p.add_argument(
        "data",
        help="CSV with a header, .npz with X and y, or sklearn:digits|iris|wine|breast_cancer",
    )
    p.add_argument("--out", required=True, help="output folder (checkpoint.npz, metrics.json, ...)")
    p.add_argument("--config", help="JSON file with the same options (command line wins)")
    add_options(p, TRAIN_OPTIONS)
    test = p.add_mutually_exclusive_group()
    add_options(test, ("test", "test_split"))
    add_options(p, ("val_split", "patience", "seed", "dtype", "label", *COLUMN_OPTIONS))
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--stream",
        action="store_true",
        help="out-of-core: read the file in chunks every epoch instead of holding it "
        "(numeric feature columns; rows split by a hash of their values)",
    )
    p.add_argument(
        "--chunk-rows",
        type=_positive_int,
        default=65536,
        help="rows per chunk with --stream (default 65536; the shuffle buffer holds 4 chunks)",
    )
    p.add_argument(
        "--ensemble",
        type=_positive_int,
        metavar="K",
        help="train K members with seeds derived from --seed on the same split, into "
        "OUT/member-0 ... and OUT/ensemble.json (bnserve convert OUT makes one ONNX graph)",
    )
    p.add_argument(
        "--jobs",
        type=_positive_int,
        help="with --ensemble: parallel processes (default: the number of cores)",
    )
    return p


def build_config(args: argparse.Namespace) -> Any:
    """TrainConfig from defaults, then the --config file, then the options given on the command line."""
    values: dict[str, Any] = {}
    if args.config:
        values.update(read_config_file(args.config, TrainConfig.option_names()))
    for key in TrainConfig.option_names():
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    # --test and --test-split exclude each other: the one on the command line beats the file's.
    if args.test is not None:
        values.pop("test_split", None)
    if args.test_split is not None:
        values.pop("test", None)
    try:
        return TrainConfig(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(str(e)) from e


def read_config_file(path: str, keys: list[str]) -> dict[str, Any]:
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: not a JSON config file ({e})") from e
    if isinstance(raw, dict) and isinstance(raw.get("config"), dict):
        raw = raw["config"]  # a tune best.json keeps the options under "config"
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a JSON object of options")
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    ignored = {"data", "out", "quiet"}
    unknown = sorted(set(values) - set(keys) - ignored)
    if unknown:
        raise UsageError(f"{path}: unknown options {', '.join(unknown)}; known: {', '.join(keys)}")
    return {k: v for k, v in values.items() if k in keys}


def make_output_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{out}: cannot create the output folder ({e.strerror or e})") from e


def history_csv(history: list[dict[str, float]]) -> str:
    buf = io.StringIO()
    if history:
        writer = csv.DictWriter(buf, fieldnames=list(history[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(history)
    return buf.getvalue()


def train_main(argv: list[str]) -> int:
    for module in ("tqdm", "matplotlib"):
        require_extra(module, "train", "train")
    from tqdm import tqdm

    from bnserve.models.data import describe_data, load_dataset
    from bnserve.models.plots import plot_curves
    from bnserve.models.stream import train_stream
    from bnserve.models.train import train

    args = train_parser().parse_args(argv)
    config = build_config(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; --out names the output folder")
    check_output_dir(out)  # before training, not after it
    if args.ensemble is None and args.jobs is not None:
        raise UsageError("--jobs runs the members of --ensemble K in parallel; add --ensemble")
    if args.ensemble is not None:
        if args.stream:
            raise UsageError("--ensemble trains in memory; it cannot be combined with --stream")
        return train_ensemble_main(args, config, out)

    show = not args.quiet and sys.stderr.isatty()
    bar = tqdm(total=config.epochs, desc="training", unit="epoch", disable=not show)

    def on_epoch(row: dict[str, float]) -> None:
        bar.set_postfix(
            loss=f"{row['train_loss']:.4f}",
            acc=f"{row['train_accuracy']:.3f}",
            val_acc=f"{row['val_accuracy']:.3f}",
        )
        bar.update(1)

    try:
        if args.stream:
            result = train_stream(config, args.data, args.chunk_rows, on_epoch)
        else:
            options = config.column_options()
            data = load_dataset(args.data, config.label, options, DTYPES[config.dtype])
            if not args.quiet:
                print(describe_data(data), file=sys.stderr)
            result = train(config, data, on_epoch)
    finally:
        bar.close()
    check_usable(result, config)
    make_output_dir(out)
    write_run(result, out)
    plot_curves(result.history, out / "curves.png")
    print(summary_line(result.metrics, out / "checkpoint.npz"))
    return 0


def check_usable(result: Any, config: TrainConfig, what: str = "training") -> None:
    """TrainingDiverged (exit 1, nothing written) when a run kept no usable epoch."""
    if result.metrics["diverged"] and result.metrics["best_epoch"] == 0:
        raise TrainingDiverged(
            f"{what} diverged in epoch {result.metrics['epochs']} before any usable weights "
            f"(loss {result.history[-1]['train_loss']:.3g}); lower --lr (now {config.lr:g}); "
            "nothing was written"
        )


def write_run(result: Any, out: Path) -> None:
    """A run's checkpoint.npz, metrics.json and history.csv in `out`, each atomically."""
    from bnserve.models.checkpoint import save_checkpoint

    save_checkpoint(result.checkpoint, out / "checkpoint.npz")
    write_text_atomic(out / "metrics.json", json.dumps(result.metrics, indent=2) + "\n")
    write_text_atomic(out / "history.csv", history_csv(result.history))


def train_ensemble_main(args: argparse.Namespace, config: TrainConfig, out: Path) -> int:
    """`bnserve train --ensemble K`: the members in parallel processes, then their files and the
    manifest (models/ensemble.py)."""
    import os

    require_extra("threadpoolctl", "train", "train --ensemble")
    from tqdm import tqdm

    from bnserve.models.data import describe_data, load_dataset
    from bnserve.models.ensemble import train_ensemble, write_ensemble

    data = load_dataset(args.data, config.label, config.column_options(), DTYPES[config.dtype])
    if not args.quiet:
        print(describe_data(data), file=sys.stderr)
    show = not args.quiet and sys.stderr.isatty()
    bar = tqdm(total=args.ensemble, desc="training members", unit="member", disable=not show)
    try:
        result = train_ensemble(
            config,
            data,
            args.ensemble,
            jobs=args.jobs or os.cpu_count() or 1,
            on_member=lambda i, r: bar.update(1),
        )
    finally:
        bar.close()
    for i, member in enumerate(result.members):
        check_usable(member, config, f"member {i} (seed {result.seeds[i]})")
    make_output_dir(out)
    manifest = write_ensemble(result, out, write_run)
    for i, member in enumerate(result.members):
        path = out / f"member-{i}" / "checkpoint.npz"
        print(f"member {i} (seed {result.seeds[i]}): {summary_line(member.metrics, path)}")
    m = result.metrics
    print(
        f"ensemble of {args.ensemble}{' (bagging)' if config.bagging else ''}: test accuracy "
        f"{_fmt(m['test_accuracy'])} (loss {_fmt(m['test_loss'])}; members mean "
        f"{_fmt(m['members_mean_test_accuracy'])}, best {_fmt(m['members_best_test_accuracy'])}), "
        f"val {_fmt(m['val_accuracy'])} -> {manifest}"
    )
    return 0


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def summary_line(m: dict[str, Any], path: Path) -> str:
    stopped = " (diverged: kept the best weights)" if m.get("diverged") else ""
    return (
        f"test accuracy {_fmt(m['test_accuracy'])} (loss {_fmt(m['test_loss'])}), "
        f"train {_fmt(m['train_accuracy'])}, val {_fmt(m['val_accuracy'])}, "
        f"{m['epochs']} epochs (best {m['best_epoch']}){stopped}, {m['seconds']:.1f} s, "
        f"{m['stats']} statistics -> {path}"
    )


# --- evaluate -----------------------------------------------------------------------------------


def evaluate_main(argv: list[str]) -> int:
    p = _Parser(prog="bnserve evaluate", description="Evaluate a checkpoint on a data set.")
    p.add_argument("checkpoint", help="checkpoint.npz written by bnserve train")
    p.add_argument("data", help="CSV (columns matched by feature name), .npz or sklearn:NAME")
    p.add_argument(
        "--label", help="label column of a CSV (default: the one used in training, else the last)"
    )
    p.add_argument("--stats", choices=["running", "population"], help="default: the checkpoint's")
    p.add_argument(
        "--all-rows",
        action="store_true",
        help="score every row; by default the training data is scored on its held-out test part",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--plot", help="write the confusion matrix as a PNG")
    args = p.parse_args(argv)
    if args.plot:
        check_output_path(args.plot)
    from bnserve.models.checkpoint import load_checkpoint
    from bnserve.models.data import load_for_model
    from bnserve.models.metrics import classification_report, format_report
    from bnserve.models.train import evaluation_rows

    ckpt = load_checkpoint(args.checkpoint)
    # A model trained with --label species is evaluated on the same kind of file without
    # repeating it: the default last column would be a feature there.
    trained_label = ckpt.config.get("label")
    label = args.label or (trained_label if isinstance(trained_label, str) else None)
    X, y = load_for_model(args.data, ckpt.feature_names, ckpt.class_names, label, ckpt.preprocessor)
    chosen = evaluation_rows(ckpt, X, y, args.all_rows)
    stats = ckpt.resolve_stats(args.stats)
    X_scored, y_scored = X[chosen.rows], y[chosen.rows]
    report = classification_report(y_scored, ckpt.predict_proba(X_scored, stats), ckpt.class_names)
    report.update(
        stats=stats,
        split=chosen.split,
        rows_scored=len(chosen.rows),
        rows_total=len(y),
        split_note=chosen.note,
    )
    if args.plot:
        require_extra("matplotlib", "train", "evaluate --plot")
        from bnserve.models.plots import plot_confusion

        plot_confusion(report, args.plot)
    print(json.dumps(report, indent=2) if args.json else f"{chosen.note}\n{format_report(report)}")
    return 0


# --- tune ---------------------------------------------------------------------------------------


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LOW,HIGH (e.g. 1e-4,0.1), got {text!r}"
        ) from None
    if not 0 < lo < hi:
        raise argparse.ArgumentTypeError(f"expected 0 < LOW < HIGH, got {text!r}")
    return lo, hi


def _str_list(choices: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [v for v in values if v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(
                f"expected a list of {', '.join(choices)}, got {text!r}"
            )
        return values

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _study_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Options shared by tune and compare: what is held fixed while the study varies the rest."""
    p.add_argument("data", help="CSV with a header, .npz with X and y, or sklearn:NAME")
    p.add_argument("--out", required=True, help="output folder")
    names = ("activation", "optimizer", "epochs", "seed", "test_split", "val_split", "label")
    add_options(p, (*names, *COLUMN_OPTIONS), defaults)
    p.add_argument(
        "--jobs", type=_positive_int, help="parallel processes (default: the number of cores)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def tune_main(argv: list[str]) -> int:
    for module in ("tqdm", "matplotlib", "threadpoolctl"):
        require_extra(module, "train", "tune")
    import math
    import os

    from tqdm import tqdm

    from bnserve.models.data import load_dataset
    from bnserve.models.plots import plot_search
    from bnserve.models.tune import SearchSpace, search, write_best

    p = _Parser(prog="bnserve tune", description="Random hyperparameter search, coarse to fine.")
    _study_options(p, {"epochs": 30})
    p.add_argument("--trials", type=int, default=40, help="trials over all rounds")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--keep",
        type=float,
        default=0.25,
        help="fraction of best trials the next box is shrunk around",
    )
    add_options(p, ("patience",), {"patience": 5})
    p.add_argument("--resume", action="store_true", help="continue the search in --out")
    p.add_argument(
        "--dask",
        metavar="SCHEDULER",
        help="run the trials on a Dask cluster: a scheduler address (tcp://host:8786), or "
        "'local' for a LocalCluster of --jobs processes (needs the dask extra)",
    )
    d = SearchSpace()
    p.add_argument(
        "--lr-range",
        type=_range,
        default=(10 ** d.lr_log10[0], 10 ** d.lr_log10[1]),
        help="sampled log-uniformly (default 1e-4,0.1)",
    )
    p.add_argument(
        "--one-minus-beta1-range",
        type=_range,
        default=(1e-3, 1e-1),
        help="1-beta1 sampled log-uniformly (default 1e-3,0.1: beta1 0.9..0.999)",
    )
    p.add_argument("--weight-decay-range", type=_range, default=(1e-6, 1e-2))
    p.add_argument("--widths", type=int_list, default=d.widths, help="hidden widths to choose from")
    p.add_argument("--depths", type=int_list, default=d.depths, help="numbers of hidden layers")
    p.add_argument("--batch-sizes", type=int_list, default=d.batch_sizes)
    p.add_argument("--placements", type=_str_list(PLACEMENTS), default=d.placements)
    args = p.parse_args(argv)
    if not 0 < args.keep <= 1:
        raise UsageError("--keep must be a fraction in (0, 1]")
    if args.val_split <= 0:
        # Trials are ranked by validation accuracy: without a validation split there is no score.
        raise UsageError("tune ranks trials by validation accuracy; --val-split must be > 0")
    space = SearchSpace(
        lr_log10=tuple(math.log10(v) for v in args.lr_range),
        one_minus_beta1_log10=tuple(math.log10(v) for v in args.one_minus_beta1_range),
        weight_decay_log10=tuple(math.log10(v) for v in args.weight_decay_range),
        widths=args.widths,
        depths=args.depths,
        batch_sizes=args.batch_sizes,
        placements=args.placements,
    )
    base = {
        "activation": args.activation,
        "optimizer": args.optimizer,
        "epochs": args.epochs,
        "patience": args.patience,
        "test_split": args.test_split,
        "val_split": args.val_split,
        "label": args.label,
        "split_seed": args.seed,
        **{name: getattr(args, name) for name in COLUMN_OPTIONS},
    }
    try:  # options every trial shares fail here once, not as N failed trials
        shared = TrainConfig(**base)
    except ValueError as e:
        raise UsageError(str(e)) from e
    # bad data fails here, before any process starts
    load_dataset(args.data, args.label, shared.column_options())
    out = Path(args.out)
    check_output_dir(out)
    show = not args.quiet and sys.stderr.isatty()
    bar = tqdm(total=args.trials, desc="tuning", unit="trial", disable=not show)

    def on_trial(row: dict[str, Any], best: dict[str, Any] | None) -> None:
        if best:
            bar.set_postfix(best_val_acc=f"{best['val_accuracy']:.4f}", best_lr=f"{best['lr']:.2g}")
        bar.update(1)

    try:
        result = search(
            args.data, out, base, space, args.trials, args.rounds, args.jobs or os.cpu_count(),
            args.seed, args.keep, args.resume, on_trial, args.dask,
        )  # fmt: skip
    finally:
        bar.close()
    if result.best is None:
        raise UsageError(f"no trial finished successfully; see {out / 'trials.csv'}")
    write_best(out / "best.json", base, result.best, space)
    plot_search(result.rows, out / "search.png")
    b = result.best
    print(
        f"best of {len(result.rows)} trials: val accuracy {b['val_accuracy']:.4f} "
        f"(loss {b['val_loss']:.4f}) with lr {b['lr']:.3g}, "
        f"beta1 {b['beta1']:.4f}, hidden {'x'.join(map(str, b['hidden']))}, batch {b['batch_size']}, "
        f"BN {b['bn']}, weight decay {b['weight_decay']:.2g} -> {out / 'best.json'}"
    )
    return 0


# --- compare ------------------------------------------------------------------------------------


def _float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def compare_main(argv: list[str]) -> int:
    for module in ("tqdm", "matplotlib", "threadpoolctl"):
        require_extra(module, "train", "compare")
    import os

    from tqdm import tqdm

    from bnserve.models.compare import compare
    from bnserve.models.data import load_dataset
    from bnserve.models.plots import plot_compare

    p = _Parser(
        prog="bnserve compare",
        description="Train with BN before, after and none at several learning rates.",
    )
    _study_options(p, {"epochs": 30, "activation": "sigmoid", "optimizer": "sgd"})
    p.add_argument(
        "--lr",
        type=_float_list,
        default=[0.03, 0.3, 3.0],
        help="learning rates (default 0.03,0.3,3)",
    )
    add_options(p, ("hidden", "batch_size"), {})
    p.add_argument(
        "--target", type=float, default=0.9, help="validation accuracy for 'epochs to target'"
    )
    args = p.parse_args(argv)
    if args.val_split <= 0:
        raise UsageError(
            "'epochs to target' is measured on validation data; --val-split must be > 0"
        )
    try:
        base = TrainConfig(
            hidden=args.hidden, activation=args.activation, optimizer=args.optimizer,
            epochs=args.epochs, patience=args.epochs, batch_size=args.batch_size, seed=args.seed,
            test_split=args.test_split, val_split=args.val_split, label=args.label,
            **{name: getattr(args, name) for name in COLUMN_OPTIONS},
        )  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from e
    data = load_dataset(args.data, args.label, base.column_options())
    out = Path(args.out)
    check_output_dir(out)
    show = not args.quiet and sys.stderr.isatty()
    bar = tqdm(total=3 * len(args.lr), desc="comparing", unit="run", disable=not show)
    try:
        rows = compare(
            data,
            base,
            args.lr,
            args.target,
            args.jobs or os.cpu_count() or 1,
            lambda: bar.update(1),
        )
    finally:
        bar.close()
    fields = [
        "lr",
        "bn",
        "test_accuracy",
        "val_accuracy",
        "final_train_loss",
        "epochs_to_target",
        "diverged",
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    make_output_dir(out)
    write_text_atomic(out / "compare.csv", buf.getvalue())
    plot_compare(rows, out / "compare.png")
    print(
        f"{'lr':>8} {'BN':>7} {'test acc':>9} {'final loss':>11} {f'epochs to {args.target:g}':>16}"
    )
    for r in rows:
        reach = "never" if r["epochs_to_target"] is None else str(r["epochs_to_target"])
        print(
            f"{r['lr']:>8g} {r['bn']:>7} {_fmt(r['test_accuracy']):>9} {r['final_train_loss']:>11.4f} {reach:>16}"
        )
    print(f"-> {out / 'compare.csv'}, {out / 'compare.png'}")
    return 0
