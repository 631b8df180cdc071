"""The `bnserve serve` options, each declared once: flag, environment variable, kind, default, help.

The parser is generated from the table, and the environment is read only after parsing, so
`--help` and `--version` work whatever the environment holds. A flag wins over its variable; a
bad value names the flag or the variable it came from.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import bnserve
from bnserve.errors import UsageError
from bnserve.service.config import (
    DEVICES,
    LOG_LEVELS,
    MODEL_CONTROL_MODES,
    OUTPUT_KINDS,
    WORKER_CLASSES,
    default_workers,
)
from bnserve.service.profile import ON_OUT_OF_RANGE

_DAY = 86400.0


# -- kinds: text -> value, raising ValueError with the end of a sentence ("must be ...") --------


def _integer(text: str, minimum: int, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"must be an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"must be at most {maximum}, got {value}")
    return value


def _number(text: str, minimum: float, strict: bool, maximum: float = math.inf) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a number, got {text!r}") from None
    if not (value > minimum if strict else value >= minimum) or not value < maximum:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(
            f"must be {bound}"
            + (f" and < {maximum:g}" if maximum < math.inf else "")
            + f", got {text!r}"
        )
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    return _integer(text, 0)


def port(text: str) -> int:
    return _integer(text, 0, 65535)


def positive_number(text: str) -> float:
    return _number(text, 0.0, strict=True)


def positive_seconds(text: str) -> float:
    return _number(text, 0.0, strict=True, maximum=_DAY)


def non_negative_seconds(text: str) -> float:
    return _number(text, 0.0, strict=False)


def text(value: str) -> str:
    return value


def choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    parse.__name__ = "choice"
    return parse


def boolean(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"must be true or false, got {value!r}")


# -- the table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option: `name` is the flag without dashes (and the result's attribute, with _)."""

    name: str
    kind: Callable[[str], Any]
    default: Any  # a value, or a zero-argument callable computed when needed
    help: str
    env: tuple[str, ...] = ()  # variables read in order when the flag is absent
    positional: bool = False
    choices: tuple[str, ...] | None = None

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


def _env(name: str) -> tuple[str, ...]:
    return (f"BNSERVE_{name}",)


SERVE_OPTIONS: tuple[Option, ...] = (
    Option(
        "model",
        text,
        None,
        "an .onnx file or a REPO/<name>/<version>/model.onnx directory",
        _env("MODEL"),
        positional=True,
    ),
    Option(
        "model-name",
        text,
        None,
        "name of a single .onnx model (default: file stem); for a repository, the model that "
        "POST /predict serves",
        _env("MODEL_NAME"),
    ),
    Option(
        "device",
        choice(*DEVICES),
        "cpu",
        "cuda refuses to start without a working CUDA provider; auto picks it when it works",
        _env("DEVICE"),
        choices=DEVICES,
    ),
    Option(
        "workers",
        positive_int,
        default_workers,
        "gunicorn worker processes (default: one per core, capped by the cgroup CPU quota)",
        _env("WORKERS"),
    ),
    Option(
        "worker-class",
        choice(*WORKER_CLASSES),
        None,
        "gevent (default) serves many connections per worker, keeps them alive and cannot be "
        "blocked by slow clients; sync and gthread only behind a buffering proxy (nginx)",
        _env("WORKER_CLASS"),
        choices=WORKER_CLASSES,
    ),
    Option(
        "threads",
        positive_int,
        1,
        "threads per gthread worker; above 1 without --worker-class selects gthread",
        _env("THREADS"),
    ),
    Option(
        "worker-connections",
        positive_int,
        1000,
        "gevent: most open connections per worker; more wait to be accepted",
        _env("WORKER_CONNECTIONS"),
    ),
    Option(
        "keep-alive",
        positive_int,
        5,
        "seconds an idle kept-alive connection stays open, and the deadline for a request's "
        "headers",
        _env("KEEP_ALIVE"),
    ),
    Option(
        "body-timeout",
        positive_seconds,
        10.0,
        "seconds to receive a whole request body; a slower or short body gets 408 and the "
        "connection is closed",
        _env("BODY_TIMEOUT"),
    ),
    Option(
        "intra-op-threads",
        positive_int,
        1,
        "onnxruntime threads per session",
        _env("INTRA_OP_THREADS"),
    ),
    Option("host", text, "127.0.0.1", "listen address", _env("HOST")),
    Option("port", port, 8000, "listen port (0: any free port)", _env("PORT")),
    Option(
        "grpc-port",
        port,
        8001,
        "Open Inference Protocol over gRPC (inference.GRPCInferenceService) on this port, same "
        "host (0: no gRPC server)",
        _env("GRPC_PORT"),
    ),
    Option(
        "grpc-workers",
        positive_int,
        1,
        "gRPC processes next to the gunicorn workers, each a pool of threads (about one core "
        "of gRPC traffic per process)",
        _env("GRPC_WORKERS"),
    ),
    Option(
        "grpc-max-calls",
        positive_int,
        128,
        "calls one gRPC process holds at once, running or waiting for a thread; more are "
        "refused at once with RESOURCE_EXHAUSTED (a flood cannot queue without bound)",
        _env("GRPC_MAX_CALLS"),
    ),
    Option(
        "grpc-max-connection-age",
        non_negative_seconds,
        300.0,
        "close a gRPC connection after this many seconds (calls under way get --timeout to "
        "finish; the client reconnects), so long-lived clients spread over the gRPC processes "
        "and the pods behind a Service (0: never)",
        _env("GRPC_MAX_CONNECTION_AGE"),
    ),
    Option("max-batch", positive_int, 64, "most rows per request", _env("MAX_BATCH")),
    Option(
        "max-body-mb",
        positive_number,
        16.0,
        "largest request body (and gRPC message) in MiB; larger ones get 413 "
        "(gRPC: RESOURCE_EXHAUSTED)",
        _env("MAX_BODY_MB"),
    ),
    Option(
        "output-kind",
        choice(*OUTPUT_KINDS),
        "auto",
        "how to read the class scores (auto: from metadata, else Softmax or not)",
        choices=OUTPUT_KINDS,
    ),
    Option(
        "timeout",
        positive_int,
        30,
        "seconds before a silent worker is restarted, and the graceful stop time",
        _env("TIMEOUT"),
    ),
    Option(
        "log-level",
        choice(*LOG_LEVELS),
        "info",
        "the JSON access log is written at info and debug",
        _env("LOG_LEVEL"),
        choices=LOG_LEVELS,
    ),
    Option(
        "access-log",
        boolean,
        True,
        "one JSON line per request on stderr",
        _env("ACCESS_LOG"),
    ),
    Option(
        "token-file",
        text,
        None,
        "require 'Authorization: Bearer <token>' with a token from this file (one per line); "
        "health routes stay open; re-read on SIGHUP",
        _env("TOKEN_FILE"),
    ),
    Option(
        "public-metrics",
        boolean,
        False,
        "with --token-file: serve /metrics without a token",
        _env("PUBLIC_METRICS"),
    ),
    Option(
        "drain-seconds",
        non_negative_seconds,
        0.0,
        "on SIGTERM, answer readiness 503 while serving for this long, then stop gracefully",
        _env("DRAIN_SECONDS"),
    ),
    Option(
        "max-requests",
        non_negative_int,
        0,
        "recycle a worker after this many requests (0: never)",
        _env("MAX_REQUESTS"),
    ),
    Option(
        "max-requests-jitter",
        non_negative_int,
        None,
        "random extra requests per worker before recycling (default: max-requests / 10)",
        _env("MAX_REQUESTS_JITTER"),
    ),
    Option(
        "model-control",
        choice(*MODEL_CONTROL_MODES),
        "none",
        "none: the repository load/unload routes answer 403 (SIGHUP still reloads); explicit: "
        "they load and unload models, with the token when one is set; poll: the repository is "
        "re-scanned every --repository-poll-secs and served as it is (load/unload answer 403)",
        _env("MODEL_CONTROL"),
        choices=MODEL_CONTROL_MODES,
    ),
    Option(
        "repository-poll-secs",
        positive_seconds,
        15.0,
        "with --model-control poll: seconds between two scans of the model repository",
        _env("REPOSITORY_POLL_SECS"),
    ),
    Option(
        "on-out-of-range",
        choice(*ON_OUT_OF_RANGE),
        "flag",
        "inputs outside the model's training profile (a number beyond [min - k std, max + k std] "
        "of training, an unseen category): flag (warnings in the answer, counted), ignore, or "
        "reject (400)",
        _env("ON_OUT_OF_RANGE"),
        choices=ON_OUT_OF_RANGE,
    ),
    Option(
        "out-of-range-k",
        positive_number,
        4.0,
        "k of the allowed range [min - k std, max + k std]",
        _env("OUT_OF_RANGE_K"),
    ),
    Option(
        "drift-window-secs",
        positive_seconds,
        600.0,
        "the window of recent inputs each model's drift (PSI against its training deciles, "
        "GET /models/{m}/drift) is computed on",
        _env("DRIFT_WINDOW_SECS"),
    ),
    Option(
        "allow-signature-change",
        boolean,
        False,
        "let a reload serve a model whose inputs, outputs or labels differ from the served one "
        '(a load request can allow it with {"parameters": {"allow_signature_change": true}})',
        _env("ALLOW_SIGNATURE_CHANGE"),
    ),
    Option(
        "runtime-dir",
        text,
        None,
        "writable directory for the model copies, tokens and reload state (default: a new one "
        "under the temp directory, removed at exit)",
        _env("RUNTIME_DIR"),
    ),
    Option(
        "metrics-dir",
        text,
        None,
        "prometheus multiprocess files, emptied at start (default: RUNTIME_DIR/metrics)",
        ("BNSERVE_METRICS_DIR", "PROMETHEUS_MULTIPROC_DIR"),
    ),
)


def build_parser(
    prog: str, description: str, options: tuple[Option, ...]
) -> argparse.ArgumentParser:
    """An argparse parser for `options`: no defaults of its own (None = not given)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--version", action="version", version=f"bnserve {bnserve.__version__}")
    for option in options:
        help_text = _help(option)
        if option.positional:
            parser.add_argument(option.dest, nargs="?", default=None, help=help_text)
        elif option.kind is boolean:
            parser.add_argument(
                f"--{option.name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=help_text,
            )
        else:
            parser.add_argument(
                f"--{option.name}",
                type=_flag_kind(option.kind),
                default=None,
                metavar="{" + ",".join(option.choices) + "}" if option.choices else None,
                help=help_text,
            )
    return parser


def _help(option: Option) -> str:
    default = option.default
    shown = "computed" if callable(default) else ("unset" if default is None else default)
    if option.kind is boolean and default is not None:
        shown = "on" if default else "off"
    where = f"; env {' or '.join(option.env)}" if option.env else ""
    return f"{option.help} (default: {shown}{where})"


def _flag_kind(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            return kind(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def resolve(args: argparse.Namespace, options: tuple[Option, ...]) -> dict[str, Any]:
    """{dest: value}: the flag when given, else the first set environment variable, else the
    default. A bad variable is a UsageError naming it."""
    values: dict[str, Any] = {}
    for option in options:
        value = getattr(args, option.dest)
        if value is None:
            for name in option.env:
                raw = os.environ.get(name, "").strip()
                if raw:
                    try:
                        value = option.kind(raw)
                    except ValueError as exc:
                        raise UsageError(f"{name} {exc}") from None
                    break
        values[option.dest] = option.default_value() if value is None else value
    return values
