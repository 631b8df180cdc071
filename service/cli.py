"""`bnserve serve` and `bnserve predict`.

Defaults come from BNSERVE_* environment variables (the container sets them) and flags win.
`serve` checks the models in a child process first (`bnserve.service.probe`), then runs gunicorn in this
process, so signals sent to `bnserve serve` reach the gunicorn master.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from bnserve.errors import UsageError
from bnserve.service.auth import read_tokens
from bnserve.service.config import (
    DEFAULT_CHUNK_ROWS,
    DEVICES,
    OUTPUT_KINDS,
    ServiceConfig,
    bracketed,
    default_workers,
)
from bnserve.service.logs import configure_logging
from bnserve.service.metrics import prepare_dir
from bnserve.service.options import SERVE_OPTIONS, build_parser, positive_int, resolve
from bnserve.service.probe import probe_models
from bnserve.service.reload import ModelStore
from bnserve.service.repository import default_version, find_models

log = logging.getLogger("bnserve.service")


def serve_parser() -> argparse.ArgumentParser:
    """The `bnserve serve` parser, generated from the option table (service/options.py)."""
    return build_parser(
        "bnserve serve",
        "Serve an ONNX classifier (or a Triton-layout model repository) with gunicorn. Every "
        "option can also come from the environment variable named in its help; flags win.",
        SERVE_OPTIONS,
    )


def config_from_args(argv: list[str]) -> ServiceConfig:
    """Parse `bnserve serve` arguments (and environment defaults) into a ServiceConfig."""
    values = resolve(serve_parser().parse_args(argv), SERVE_OPTIONS)
    if not values["model"]:
        raise UsageError("no model: pass an .onnx file or repository, or set BNSERVE_MODEL")
    threads = values["threads"]
    worker_class = values.pop("worker_class") or ("gthread" if threads > 1 else "gevent")
    if threads > 1 and worker_class != "gthread":
        raise UsageError(
            f"--threads {threads} needs --worker-class gthread "
            f"({worker_class} workers run one thread each)"
        )
    jitter = values.pop("max_requests_jitter")
    max_body_mb = values.pop("max_body_mb")
    return ServiceConfig(
        **values,
        worker_class=worker_class,
        max_body_bytes=int(max_body_mb * 1024 * 1024),
        max_requests_jitter=values["max_requests"] // 10 if jitter is None else jitter,
    )


def serve_main(argv: list[str]) -> int:
    """Check the models in a child process, then become the gunicorn master."""
    config = config_from_args(argv)
    configure_logging(config.log_level)
    from bnserve.service.gunicorn_conf import BnserveApplication  # gunicorn: serve only

    repository = find_models(config.model, config.model_name)  # fail fast on a bad path
    log.info(
        "checking %d model(s) from %s on device %s", len(repository), config.model, config.device
    )
    probed = probe_models(config)
    if config.device == "auto":
        log.info("--device auto: using %s", probed["device"])
        config = replace(config, device=probed["device"])
    for name, versions in probed["models"].items():
        for version, details in versions.items():
            log.info(
                "model %s version %s: %d features, %d classes (%s) on %s",
                name,
                version,
                details["n_features"],
                details["n_classes"],
                details["output_kind"],
                details["device"],
            )
    check_grpc_port(config)  # before anything starts: the gRPC processes bind it later
    config, cleanup = prepare_runtime(config, repository, probed)
    master = os.getpid()
    try:
        BnserveApplication(config, repository).run()
    finally:
        if cleanup is not None and os.getpid() == master:  # workers leave through here too
            shutil.rmtree(cleanup, ignore_errors=True)
    return 0


def check_grpc_port(config: ServiceConfig) -> None:
    """Refuse to start when the gRPC port is taken (the gRPC processes bind it with SO_REUSEPORT
    once they have loaded the models, service/grpc_server.py). The probe binds without
    SO_REUSEPORT, so a port held by anything, another bnserve's gRPC processes included (they
    would share it silently), is refused with a message, before the server starts."""
    if not config.grpc_port:
        return
    if config.grpc_port == config.port:
        raise UsageError(
            f"--grpc-port {config.grpc_port} is also the HTTP --port: give gRPC its own port "
            "(or --grpc-port 0 for none)"
        )
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            config.host, config.grpc_port, type=socket.SOCK_STREAM
        )[0]
    except OSError as exc:
        raise UsageError(f"--host {config.host}: {exc}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise UsageError(
                f"--grpc-port {config.grpc_port}: cannot listen on "
                f"{bracketed(config.host)}:{config.grpc_port}: {exc.strerror} (another server "
                "holds it? choose another port, or --grpc-port 0 for no gRPC server)"
            ) from None


def prepare_runtime(
    config: ServiceConfig, repository: Any, probed: dict[str, Any] | None = None
) -> tuple[ServiceConfig, Path | None]:
    """Before forking: token check, metrics directory, model store; returns the directory to
    remove at exit (the default runtime directory), if any."""
    # refuse to start with no usable token; workers read the store's validated copy
    tokens = read_tokens(config.token_file) if config.token_file else None
    if config.model_control == "explicit" and tokens is None:
        log.warning(
            "--model-control explicit without --token-file: anyone who reaches the server "
            "can load and unload models"
        )
    cleanup = None
    if config.runtime_dir:
        runtime_dir = Path(config.runtime_dir)
    else:
        runtime_dir = cleanup = Path(tempfile.mkdtemp(prefix="bnserve-"))
    metrics_dir = prepare_dir(config.metrics_dir or runtime_dir / "metrics")
    log.debug("runtime directory %s, metrics in %s", runtime_dir, metrics_dir)
    config = replace(config, runtime_dir=str(runtime_dir), metrics_dir=str(metrics_dir))
    signatures = {
        name: {version: details.get("signature") for version, details in versions.items()}
        for name, versions in (probed or {}).get("models", {}).items()
    }
    ModelStore(runtime_dir).init(repository, config, signatures, tokens)
    return config, cleanup


def predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bnserve predict",
        description="Score a CSV, Parquet or npz file or a bundled data set offline with the "
        "server's model loading and output handling, chunk by chunk (memory does not grow with "
        "the file); with --dask, many files on a Dask cluster.",
    )
    p.add_argument("model", help="an .onnx file or a model repository")
    p.add_argument(
        "data",
        help="a CSV or a .parquet file (columns by feature name when the model has them), an "
        ".npz (X), or sklearn:digits|iris|wine|breast_cancer (needs the 'train' extra); with "
        "--dask, also a folder or a glob of CSV / Parquet files",
    )
    p.add_argument(
        "-o",
        "--out",
        required=True,
        help="output: label, class_index, p_<label>...; Parquet for a .parquet name, else CSV; "
        "'-' writes CSV to standard output; with --dask, a folder of one file per partition",
    )
    p.add_argument("--model-name", default=None, help="which model of a repository")
    p.add_argument(
        "--version", type=positive_int, default=None, help="which version (default: highest)"
    )
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--output-kind", choices=OUTPUT_KINDS, default="auto")
    p.add_argument("--batch-size", type=positive_int, default=4096, help="rows per onnxruntime run")
    p.add_argument(
        "--chunk-rows",
        type=positive_int,
        default=DEFAULT_CHUNK_ROWS,
        help=f"rows read, scored and written at a time (default {DEFAULT_CHUNK_ROWS}; about "
        "that many for a CSV, cut at whole rows)",
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="onnxruntime intra-op threads and pyarrow's reader threads (default: every core "
        "this process may use; with --dask: 1 per worker)",
    )
    p.add_argument(
        "--dask",
        metavar="SCHEDULER",
        default=None,
        help="score on a Dask cluster: a scheduler address (tcp://host:8786) or 'local' to "
        "start worker processes here (needs the 'dask' extra)",
    )
    p.add_argument(
        "--dask-workers",
        type=positive_int,
        default=None,
        help="worker processes of --dask local (default: one per core)",
    )
    return p


def predict_main(argv: list[str]) -> int:
    """`bnserve predict MODEL DATA -o OUT`."""
    args = predict_parser().parse_args(argv)
    # onnxruntime and pyarrow: never in the process that becomes the gunicorn master (`serve`)
    from bnserve.service.offline import STDOUT, predict
    from bnserve.service.runtime import ModelRuntime

    path, name, version = _chosen_model(args.model, args.model_name, args.version)
    if args.dask is not None:
        return _predict_dask(args, path, name, version)
    if args.dask_workers is not None:
        raise UsageError("--dask-workers goes with --dask local")
    threads = args.threads or default_workers()
    import pyarrow  # its CPU pool parses the input: as many threads as onnxruntime's

    pyarrow.set_cpu_count(threads)
    runtime = ModelRuntime.load(path, name, version, args.device, threads, args.output_kind)
    out = Path(args.out)
    rows = predict(
        runtime,
        args.data,
        out,
        chunk_rows=args.chunk_rows,
        threads=threads,
        batch_size=args.batch_size,
    )
    # with -o - standard output holds the predictions alone
    to_stdout = args.out == STDOUT
    print(
        f"bnserve predict: {rows} rows scored with {name} v{version} -> "
        f"{'standard output' if to_stdout else out}",
        file=sys.stderr if to_stdout else sys.stdout,
    )
    return 0


def _chosen_model(model: str, model_name: str | None, version: int | None) -> tuple[Path, str, int]:
    """The file of the model a `predict` command names: a file, or one of a repository."""
    repository = find_models(model, model_name)
    if model_name is None and len(repository) > 1:
        raise UsageError(f"{model} has several models ({', '.join(repository)}): pass --model-name")
    name = model_name or next(iter(repository))
    versions = repository[name]
    version = version or default_version(versions)
    if version not in versions:
        raise UsageError(
            f"model {name!r} has no version {version} (versions: {', '.join(map(str, versions))})"
        )
    return Path(versions[version]), name, version


def _predict_dask(args: argparse.Namespace, path: Path, name: str, version: int) -> int:
    """`predict --dask`: every file of DATA on a Dask cluster, one output file per partition."""
    from bnserve.service.batch import ModelRef, predict_dask

    if args.out == "-":
        raise UsageError("--dask writes a folder of files: -o - (standard output) is not possible")
    if args.dask_workers is not None and args.dask != "local":
        raise UsageError("--dask-workers goes with --dask local (a remote cluster has its own)")
    model = ModelRef.of(path, name, version, args.device, args.output_kind, args.threads or 1)
    result = predict_dask(
        model,
        args.data,
        Path(args.out),
        args.dask,
        workers=args.dask_workers,
        chunk_rows=args.chunk_rows,
        batch_size=args.batch_size,
    )
    print(
        f"bnserve predict: {result.rows} rows of {result.files} file(s) scored with {name} "
        f"v{version} on {result.workers} Dask worker(s) -> {result.out} "
        f"({result.parts} part(s))"
    )
    return 0
