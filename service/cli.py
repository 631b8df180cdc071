"""`bnserve serve` and `bnserve predict`.

Defaults come from BNSERVE_* environment variables (the container sets them) and flags win.
`serve` checks the models in a child process first (`service.probe`), then runs gunicorn in this
process, so signals sent to `bnserve serve` reach the gunicorn master.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from bnserve.errors import UsageError
from service.config import (
    DEVICES,
    LOG_LEVELS,
    MODEL_CONTROL_MODES,
    OUTPUT_KINDS,
    WORKER_CLASSES,
    ServiceConfig,
    default_workers,
    env_bool,
    env_float,
    env_int,
    env_str,
)

log = logging.getLogger("bnserve.service")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0..65535, got {value}")
    return value


def _choice_env(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default)
    assert value is not None
    if value.lower() not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value.lower()


def serve_parser() -> argparse.ArgumentParser:
    """The `bnserve serve` options, with defaults read from the environment now."""
    p = argparse.ArgumentParser(
        prog="bnserve serve",
        description="Serve an ONNX classifier (or a Triton-layout model repository) with gunicorn.",
        epilog="Environment defaults: BNSERVE_MODEL, BNSERVE_MODEL_NAME, BNSERVE_DEVICE, "
        "BNSERVE_WORKERS, BNSERVE_THREADS, BNSERVE_PORT, BNSERVE_HOST, BNSERVE_LOG_LEVEL, "
        "BNSERVE_MAX_BATCH, BNSERVE_MAX_BODY_MB, BNSERVE_TIMEOUT, BNSERVE_TOKEN_FILE, "
        "BNSERVE_PUBLIC_METRICS, BNSERVE_DRAIN_SECONDS, BNSERVE_MAX_REQUESTS, "
        "BNSERVE_MAX_REQUESTS_JITTER, BNSERVE_ACCESS_LOG, BNSERVE_RUNTIME_DIR, "
        "BNSERVE_METRICS_DIR (else PROMETHEUS_MULTIPROC_DIR), BNSERVE_WORKER_CLASS, "
        "BNSERVE_WORKER_CONNECTIONS, BNSERVE_KEEP_ALIVE, BNSERVE_BODY_TIMEOUT, "
        "BNSERVE_MODEL_CONTROL, BNSERVE_ALLOW_SIGNATURE_CHANGE; flags win.",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=env_str("BNSERVE_MODEL", None),
        help="an .onnx file or a REPO/<name>/<version>/model.onnx directory",
    )
    p.add_argument(
        "--model-name",
        default=env_str("BNSERVE_MODEL_NAME", None),
        help="name of a single .onnx model (default: file stem); for a repository, "
        "the model that POST /predict serves",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default=_choice_env("BNSERVE_DEVICE", "cpu", DEVICES),
        help="cuda refuses to start without a working CUDA provider; auto picks it when "
        "it works (default: cpu)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=env_int("BNSERVE_WORKERS", default_workers()),
        help="gunicorn worker processes (default: one per core)",
    )
    p.add_argument(
        "--threads",
        type=_positive,
        default=env_int("BNSERVE_THREADS", 1),
        help="threads per gthread worker; above 1 without --worker-class selects gthread "
        "(default: 1)",
    )
    p.add_argument(
        "--worker-class",
        choices=WORKER_CLASSES,
        default=_choice_env("BNSERVE_WORKER_CLASS", "", ("", *WORKER_CLASSES)) or None,
        help="gevent (default) serves many connections per worker, keeps them alive and "
        "cannot be blocked by slow clients; sync only behind a buffering proxy (nginx)",
    )
    p.add_argument(
        "--worker-connections",
        type=_positive,
        default=env_int("BNSERVE_WORKER_CONNECTIONS", 1000),
        help="gevent: most open connections per worker; more wait to be accepted (default: 1000)",
    )
    p.add_argument(
        "--keep-alive",
        type=_positive,
        default=env_int("BNSERVE_KEEP_ALIVE", 5),
        help="seconds an idle kept-alive connection stays open, and the deadline for a "
        "request's headers (default: 5)",
    )
    p.add_argument(
        "--body-timeout",
        type=_positive_seconds,
        default=env_float("BNSERVE_BODY_TIMEOUT", 10.0),
        help="seconds to receive a whole request body; a slower or short body gets 408 and "
        "the connection is closed (default: 10)",
    )
    p.add_argument(
        "--intra-op-threads",
        type=_positive,
        default=env_int("BNSERVE_INTRA_OP_THREADS", 1),
        help="onnxruntime threads per session (default: 1)",
    )
    p.add_argument("--host", default=env_str("BNSERVE_HOST", "127.0.0.1"))
    p.add_argument("--port", type=_port, default=env_int("BNSERVE_PORT", 8000, minimum=0))
    p.add_argument(
        "--max-batch",
        type=_positive,
        default=env_int("BNSERVE_MAX_BATCH", 64),
        help="most rows per request (default: 64)",
    )
    p.add_argument(
        "--max-body-mb",
        type=float,
        default=env_float("BNSERVE_MAX_BODY_MB", 16.0),
        help="largest request body in MiB; larger ones get 413 (default: 16)",
    )
    p.add_argument(
        "--output-kind",
        choices=OUTPUT_KINDS,
        default="auto",
        help="how to read the class scores (default: from metadata, else Softmax or not)",
    )
    p.add_argument(
        "--timeout",
        type=_positive,
        default=env_int("BNSERVE_TIMEOUT", 30),
        help="seconds before a silent worker is restarted, and the graceful stop time",
    )
    p.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=_choice_env("BNSERVE_LOG_LEVEL", "info", LOG_LEVELS),
        help="the JSON access log is written at info and debug (default: info)",
    )
    p.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=env_bool("BNSERVE_ACCESS_LOG", True),
        help="one JSON line per request on stderr (default: on)",
    )
    p.add_argument(
        "--token-file",
        default=env_str("BNSERVE_TOKEN_FILE", None),
        help="require 'Authorization: Bearer <token>' with a token from this file (one per "
        "line); health routes stay open",
    )
    p.add_argument(
        "--public-metrics",
        action=argparse.BooleanOptionalAction,
        default=env_bool("BNSERVE_PUBLIC_METRICS", False),
        help="with --token-file: serve /metrics without a token (default: token needed)",
    )
    p.add_argument(
        "--drain-seconds",
        type=_non_negative,
        default=env_float("BNSERVE_DRAIN_SECONDS", 0.0, allow_zero=True),
        help="on SIGTERM, answer readiness 503 while serving for this long, then stop "
        "gracefully (default: 0, stop at once)",
    )
    p.add_argument(
        "--max-requests",
        type=_non_negative_int,
        default=env_int("BNSERVE_MAX_REQUESTS", 0, minimum=0),
        help="recycle a worker after this many requests (default: 0, never)",
    )
    p.add_argument(
        "--max-requests-jitter",
        type=_non_negative_int,
        default=env_int("BNSERVE_MAX_REQUESTS_JITTER", -1, minimum=0),
        help="random extra requests per worker before recycling (default: max-requests / 10)",
    )
    p.add_argument(
        "--model-control",
        choices=MODEL_CONTROL_MODES,
        default=_choice_env("BNSERVE_MODEL_CONTROL", "none", MODEL_CONTROL_MODES),
        help="none: the repository load/unload routes answer 403 (SIGHUP still reloads); "
        "explicit: they load and unload models, with the token when one is set (default: none)",
    )
    p.add_argument(
        "--allow-signature-change",
        action=argparse.BooleanOptionalAction,
        default=env_bool("BNSERVE_ALLOW_SIGNATURE_CHANGE", False),
        help="let a reload serve a model whose inputs, outputs or labels differ from the "
        "served one (default: refused with the difference logged; a load request can allow it "
        'with {"parameters": {"allow_signature_change": true}})',
    )
    p.add_argument(
        "--runtime-dir",
        default=env_str("BNSERVE_RUNTIME_DIR", None),
        help="writable directory for the model copies and reload state "
        "(default: a new one under the temp directory, removed at exit)",
    )
    p.add_argument(
        "--metrics-dir",
        default=env_str("BNSERVE_METRICS_DIR", env_str("PROMETHEUS_MULTIPROC_DIR", None)),
        help="prometheus multiprocess files, emptied at start (default: RUNTIME_DIR/metrics)",
    )
    return p


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"expected seconds > 0 (and under a day), got {text!r}")
    return value


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def config_from_args(argv: list[str]) -> ServiceConfig:
    """Parse `bnserve serve` arguments (and environment defaults) into a ServiceConfig."""
    args = serve_parser().parse_args(argv)
    if not args.model:
        raise UsageError("no model: pass an .onnx file or repository, or set BNSERVE_MODEL")
    if not args.max_body_mb > 0:
        raise UsageError(f"--max-body-mb must be positive, got {args.max_body_mb}")
    worker_class = args.worker_class or ("gthread" if args.threads > 1 else "gevent")
    if args.threads > 1 and worker_class != "gthread":
        raise UsageError(
            f"--threads {args.threads} needs --worker-class gthread "
            f"({worker_class} workers run one thread each)"
        )
    return ServiceConfig(
        model=str(args.model),
        model_name=args.model_name,
        device=args.device,
        workers=args.workers,
        threads=args.threads,
        worker_class=worker_class,
        worker_connections=args.worker_connections,
        keep_alive=args.keep_alive,
        body_timeout=args.body_timeout,
        intra_op_threads=args.intra_op_threads,
        host=args.host,
        port=args.port,
        max_batch=args.max_batch,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        output_kind=args.output_kind,
        log_level=args.log_level,
        timeout=args.timeout,
        access_log=args.access_log,
        token_file=args.token_file,
        public_metrics=args.public_metrics,
        drain_seconds=args.drain_seconds,
        max_requests=args.max_requests,
        max_requests_jitter=(
            args.max_requests // 10 if args.max_requests_jitter < 0 else args.max_requests_jitter
        ),
        runtime_dir=args.runtime_dir,
        metrics_dir=args.metrics_dir,
        model_control=args.model_control,
        allow_signature_change=args.allow_signature_change,
    )


def configure_logging(level: str) -> None:
    """Our log lines next to gunicorn's, on stderr, with the process id (workers differ)."""
    logger = logging.getLogger("bnserve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S %z"
            )
        )
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def serve_main(argv: list[str]) -> int:
    """Check the models in a child process, then become the gunicorn master."""
    config = config_from_args(argv)
    configure_logging(config.log_level)
    from service.gunicorn_conf import BnserveApplication
    from service.probe import probe_models
    from service.repository import find_models

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
    config, cleanup = prepare_runtime(config, repository, probed)
    master = os.getpid()
    try:
        BnserveApplication(config, repository).run()
    finally:
        if cleanup is not None and os.getpid() == master:  # workers leave through here too
            shutil.rmtree(cleanup, ignore_errors=True)
    return 0


def prepare_runtime(
    config: ServiceConfig, repository: Any, probed: dict[str, Any] | None = None
) -> tuple[ServiceConfig, Path | None]:
    """Before forking: token check, metrics directory, model store; returns the directory to
    remove at exit (the default runtime directory), if any."""
    from service.auth import read_tokens
    from service.metrics import prepare_dir
    from service.reload import ModelStore

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
        description="Score a CSV or npz file offline with the server's model loading and output handling.",
    )
    p.add_argument("model", help="an .onnx file or a model repository")
    p.add_argument(
        "data", help="a .csv (columns by feature name when the model has them) or .npz (X)"
    )
    p.add_argument(
        "-o", "--out", required=True, help="output CSV: label, class_index, p_<label>..."
    )
    p.add_argument("--model-name", default=None, help="which model of a repository")
    p.add_argument(
        "--version", type=_positive, default=None, help="which version (default: highest)"
    )
    p.add_argument("--device", choices=DEVICES, default="cpu")
    p.add_argument("--output-kind", choices=OUTPUT_KINDS, default="auto")
    p.add_argument("--batch-size", type=_positive, default=4096)
    return p


def predict_main(argv: list[str]) -> int:
    """`bnserve predict MODEL DATA -o OUT.csv`."""
    args = predict_parser().parse_args(argv)
    from service.offline import read_features, score, write_predictions
    from service.repository import default_version, find_models
    from service.runtime import ModelRuntime

    repository = find_models(args.model, args.model_name)
    if args.model_name is None and len(repository) > 1:
        raise UsageError(
            f"{args.model} has several models ({', '.join(repository)}): pass --model-name"
        )
    name = args.model_name or next(iter(repository))
    versions = repository[name]
    version = args.version or default_version(versions)
    if version not in versions:
        raise UsageError(
            f"model {name!r} has no version {version} (versions: {', '.join(map(str, versions))})"
        )
    runtime = ModelRuntime.load(versions[version], name, version, args.device, 1, args.output_kind)
    x = read_features(Path(args.data), runtime)
    probabilities = score(runtime, x, args.batch_size)
    out = Path(args.out)
    write_predictions(out, runtime, probabilities)
    print(f"bnserve predict: {len(x)} rows scored with {name} v{version} -> {out}")
    return 0
