"""`bnserve train` (and later the study commands): parse options, run, write files. No math here."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from bnserve.atomic import write_text_atomic
from bnserve.errors import UsageError, require_extra


def _int_list(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(f"expected positive layer widths, got {text!r}")
    return widths


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 2, one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see 'bnserve {self.prog.split()[-1]} --help')")


def train_parser() -> argparse.ArgumentParser:
    # Every option defaults to None so that a --config file can fill what the command line omits.
    p = _Parser(prog="bnserve train", description="Train a batch-normalized MLP in numpy.")
    p.add_argument(
        "data",
        help="CSV with a header, .npz with X and y, or sklearn:digits|iris|wine|breast_cancer",
    )
    p.add_argument("--out", required=True, help="output folder (checkpoint.npz, metrics.json, ...)")
    p.add_argument("--config", help="JSON file with the same options (command line wins)")
    a = p.add_argument
    a("--hidden", type=_int_list, help="hidden layer widths (default 100,100,100)")
    a("--activation", choices=["relu", "leaky_relu", "tanh", "sigmoid"], help="default relu")
    a("--bn", choices=["before", "after", "none"], help="BN placement (default before)")
    a("--optimizer", choices=["sgd", "momentum", "rmsprop", "adam"], help="default adam")
    a("--lr", type=float, help="learning rate (default 1e-3)")
    a("--beta1", type=float, help="Adam beta1 (default 0.9)")
    a("--beta2", type=float, help="Adam / RMSprop beta2 (default 0.999)")
    a("--momentum", type=float, help="Momentum optimizer coefficient (default 0.9)")
    a("--weight-decay", type=float, help="L2 on weights and biases, not gamma/beta (default 0)")
    a("--lr-schedule", choices=["none", "inverse", "exponential"], help="default none")
    a("--lr-decay", type=float, help="inverse: lr/(1+decay*epoch); exponential: lr*decay**epoch")
    a("--batch-size", type=int, help="default 64")
    a("--epochs", type=int, help="maximum epochs (default 50)")
    a("--dropout", type=float, help="inverted dropout probability (default 0)")
    a("--bn-momentum", type=float, help="weight of the new batch in running stats (default 0.1)")
    a("--bn-eps", type=float, help="BN epsilon (default 1e-5)")
    a(
        "--population-stats",
        action="store_true",
        default=None,
        help="also compute exact population statistics and make them the default",
    )
    test = p.add_mutually_exclusive_group()
    test.add_argument("--test", help="separate held-out file in the same format")
    test.add_argument("--test-split", type=float, help="stratified held-out fraction (default 0.2)")
    a("--val-split", type=float, help="validation fraction of the rest (default 0.1)")
    a("--patience", type=int, help="early-stopping patience in epochs (default 10)")
    a("--seed", type=int, help="default 0")
    a("--dtype", choices=["float64", "float32"], help="default float64")
    a("--label", help="label column of a CSV (default the last)")
    a("--quiet", action="store_true", help="no progress bar")
    return p


def build_config(args: argparse.Namespace) -> Any:
    """TrainConfig from defaults, then the --config file, then the options given on the command line."""
    from models.train import TrainConfig

    values: dict[str, Any] = {}
    if args.config:
        values.update(read_config_file(args.config, TrainConfig.option_names()))
    for key in TrainConfig.option_names():
        given = getattr(args, key, None)
        if given is not None:
            values[key] = given
    if args.test is not None:
        values.pop("test_split", None)
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

    from models.checkpoint import save_checkpoint
    from models.plots import plot_curves
    from models.train import train

    args = train_parser().parse_args(argv)
    config = build_config(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a folder; --out names the output folder")

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
        result = train(config, args.data, on_epoch)
    finally:
        bar.close()
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(result.checkpoint, out / "checkpoint.npz")
    write_text_atomic(out / "metrics.json", json.dumps(result.metrics, indent=2) + "\n")
    write_text_atomic(out / "history.csv", history_csv(result.history))
    plot_curves(result.history, out / "curves.png")
    print(summary_line(result.metrics, out / "checkpoint.npz"))
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
