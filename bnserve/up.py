"""`bnserve up`: train the default digits model if there is none, convert it, serve it.

The one place allowed to drive all three stages; it does so only through the `bnserve` commands
(`bnserve.cli.main`), so each stage keeps its own options, checks and messages.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bnserve import cli
from bnserve.errors import BnserveError

DEFAULT_DIR = Path("outputs") / "default"
DEFAULT_DATA = "sklearn:digits"


def up_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnserve up",
        description="Train the default model if needed, convert it to ONNX, and serve it.",
    )
    p.add_argument(
        "--dir",
        type=Path,
        default=DEFAULT_DIR,
        help=f"where checkpoint.npz and model.onnx live (default: {DEFAULT_DIR})",
    )
    p.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"training data when no checkpoint exists (default: {DEFAULT_DATA})",
    )
    p.add_argument("--retrain", action="store_true", help="train again even if a checkpoint exists")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="Open Inference Protocol over gRPC (default: bnserve serve's --grpc-port; 0: none)",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--workers", type=int, default=None, help="default: one per core")
    return p


def run_in_child(argv: list[str]) -> int:
    """`bnserve ARGV` in a child Python process; returns its exit code."""
    return subprocess.run([sys.executable, "-m", "bnserve", *argv], check=False).returncode


def _run(argv: list[str]) -> None:
    """Run one `bnserve` subcommand; a non-zero exit stops `up` with that command named.

    Training and converting run in a child process: converting imports onnxruntime, and a gunicorn
    master that has imported onnxruntime leaves its forked workers hanging on exit. Serving runs in
    this process, so that signals sent to `bnserve up` reach the gunicorn master.
    """
    rc = cli.main(argv) if argv[0] == "serve" else run_in_child(argv)
    if rc != 0:
        raise UpError(f"'bnserve {' '.join(argv)}' failed (exit {rc})", rc)


class UpError(BnserveError):
    """A stage that `up` drives failed; its own message was printed above."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def curl_example(url: str, n_features: int) -> str:
    """A copy-paste request for a model with `n_features` inputs."""
    body = json.dumps({"features": [0.0] * n_features}, separators=(",", ":"))
    return f"curl -s {url}/predict -H 'Content-Type: application/json' -d '{body}'"


def _n_features(model: Path) -> int:
    from bnserve.service.metadata import load_info

    return load_info(model).n_features


def up_main(argv: list[str]) -> int:
    """Train (if no checkpoint), convert (if the ONNX file is missing or older), then serve."""
    args = up_parser().parse_args(argv)
    checkpoint = args.dir / "checkpoint.npz"
    model = args.dir / "model.onnx"
    if args.retrain or not checkpoint.is_file():
        print(f"bnserve up: training {args.data} into {args.dir} ...", flush=True)
        _run(["train", args.data, "--out", str(args.dir)])
        if not checkpoint.is_file():
            raise UpError(f"training finished but {checkpoint} was not written", 1)
    if not model.is_file() or model.stat().st_mtime < checkpoint.stat().st_mtime:
        print(f"bnserve up: converting {checkpoint} -> {model} ...", flush=True)
        _run(["convert", str(checkpoint), "-o", str(model)])
    url = f"http://{args.host}:{args.port}"
    print(f"bnserve up: serving {model} at {url}  (Ctrl-C stops it)")
    print(f"  try:  {curl_example(url, _n_features(model))}")
    print(f"  docs: GET {url}/predict explains the body; V2 API at {url}/v2")
    name = args.data.split(":", 1)[-1].rsplit("/", 1)[-1].split(".")[0] or "model"
    serve = [str(model), "--model-name", name, "--host", args.host, "--port", str(args.port)]
    serve += ["--device", args.device]
    if args.grpc_port is not None:
        serve += ["--grpc-port", str(args.grpc_port)]
    if args.workers is not None:
        serve += ["--workers", str(args.workers)]
    _run(["serve", *serve])
    return 0
