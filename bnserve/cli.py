"""The `bnserve` command: routes each subcommand to its stage's own cli.py.

Stages are imported only when their subcommand runs, so `bnserve serve` never imports the
trainer (and works with the base install alone).
"""

from __future__ import annotations

import importlib
import os
import sys

from bnserve.errors import BnserveError

# subcommand -> ("module under bnserve", "function", one-line help). The function takes argv and
# returns an exit code.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "train": ("models.cli", "train_main", "train a BN MLP and write a checkpoint"),
    "evaluate": ("models.cli", "evaluate_main", "evaluate a checkpoint on a data set"),
    "tune": ("models.cli", "tune_main", "random hyperparameter search, coarse to fine"),
    "compare": ("models.cli", "compare_main", "train with BN before/after/none and compare"),
    "convert": ("converter.cli", "convert_main", "fold a checkpoint into a verified ONNX model"),
    "fold": ("converter.cli", "fold_main", "fold BN in an ONNX model from another framework"),
    "inspect": ("converter.cli", "inspect_main", "show an ONNX model's graph and metadata"),
    "serve": ("service.cli", "serve_main", "serve an ONNX model over HTTP with gunicorn"),
    "predict": (
        "service.cli",
        "predict_main",
        "score CSV / Parquet / npz files offline with a model (or on Dask)",
    ),
    "up": ("up", "up_main", "train the default model if needed, convert it and serve it"),
}


def _usage() -> str:
    lines = ["usage: bnserve COMMAND [options]   (bnserve COMMAND --help for its options)", ""]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; a reader that closes our output early (`bnserve --help | head`) ends
    the command quietly instead of with a BrokenPipeError traceback."""
    try:
        code = _main(argv)
        sys.stdout.flush()
    except BrokenPipeError:
        # Python's recommended handling: point stdout at devnull so the interpreter's final
        # flush does not raise again, and exit like a process killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return code


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from bnserve import __version__

        print(f"bnserve {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"bnserve: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(f"bnserve.{module_name}")
        function = getattr(module, function_name, None)
        if function is None:
            print(f"bnserve: command {name!r} is not available in this version", file=sys.stderr)
            return 2
        return int(function(rest) or 0)
    except BnserveError as exc:
        print(f"bnserve {name}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"bnserve {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
