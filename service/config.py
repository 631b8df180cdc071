"""The service's settings and the registries of allowed values.

One frozen dataclass travels from the CLI (service/options.py: flags, then BNSERVE_* environment
variables, then defaults) through gunicorn into `create_app` in every worker.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from bnserve.errors import UsageError

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEVICES = ("cpu", "cuda", "auto")
OUTPUT_KINDS = ("auto", "probabilities", "logits")
# gevent first: it is the one that no slow or idle client can block (docs/serving.md); sync is
# for deployments behind a buffering proxy, gthread for --threads > 1.
WORKER_CLASSES = ("gevent", "sync", "gthread")
# Triton's names: `none` refuses the repository load/unload routes, `explicit` serves them.
MODEL_CONTROL_MODES = ("none", "explicit", "poll")
#: Rows `bnserve predict` reads, scores and writes at a time (service/columnar.py).
DEFAULT_CHUNK_ROWS = 65536

# The exit status of a gRPC process that could not start serving: the master then halts, as
# gunicorn does when a worker cannot boot (service/gunicorn_conf.py GrpcProcesses).
GRPC_BOOT_ERROR = 3


def grpc_heartbeat_path(runtime_dir: str, pid: int) -> Path:
    """The file gRPC process `pid` touches while its threads take work (service/grpc_server.py
    `Heartbeat`): the master kills one whose file is older than --timeout."""
    return Path(runtime_dir) / f"grpc-heartbeat-{pid}"


_CGROUP_V2_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def cgroup_cpu_limit(
    cpu_max: Path = _CGROUP_V2_CPU_MAX,
    v1_quota: Path = _CGROUP_V1_QUOTA,
    v1_period: Path = _CGROUP_V1_PERIOD,
) -> float | None:
    """The CPU quota of this process's cgroup in cores (`docker --cpus 2` gives 2.0), or None.

    cgroup v2 writes `"<quota> <period>"` (or `"max <period>"`) to cpu.max; v1 splits them over
    cpu.cfs_quota_us (-1 when unlimited) and cpu.cfs_period_us.
    """
    try:
        quota_text, period_text = cpu_max.read_text().split()[:2]
        if quota_text == "max":
            return None
        return int(quota_text) / int(period_text)
    except (OSError, ValueError):
        pass
    try:
        quota, period = int(v1_quota.read_text()), int(v1_period.read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def default_workers() -> int:
    """One worker per core this process may use (each worker runs single-threaded): the CPUs it
    may run on, capped by the container's CPU quota (a 2-CPU container on a 64-core host gets 2)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def bracketed(host: str) -> str:
    """`host` as it stands before `:port` in an address (an IPv6 literal in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


@dataclass(frozen=True)
class ServiceConfig:
    """Everything a worker needs to build the app; `model` is an .onnx file or a repository."""

    model: str = ""
    model_name: str | None = None
    device: str = "cpu"
    workers: int = 1
    threads: int = 1
    worker_class: str = "gevent"
    worker_connections: int = 1000  # open connections per gevent worker; more wait in the backlog
    keep_alive: int = 5  # idle seconds on a kept-alive connection, and the headers' deadline
    body_timeout: float = 10.0  # seconds to receive a whole request body, else 408
    intra_op_threads: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 8001  # the Open Inference Protocol over gRPC; 0: no gRPC server
    grpc_workers: int = 1  # gRPC processes (service/grpc_server.py)
    grpc_max_calls: int = 128  # calls a gRPC process holds at once; more: RESOURCE_EXHAUSTED
    grpc_max_connection_age: float = 300.0  # seconds before a gRPC connection is closed; 0: never
    max_batch: int = 64
    max_body_bytes: int = 16 * 1024 * 1024
    output_kind: str = "auto"
    log_level: str = "info"
    timeout: int = 30
    # Operations: see service/gateway.py, service/metrics.py, service/reload.py.
    access_log: bool = True
    token_file: str | None = None
    public_metrics: bool = False
    drain_seconds: float = 0.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    runtime_dir: str | None = None  # model store and state file (set by `bnserve serve`)
    metrics_dir: str | None = None  # prometheus multiprocess files (set by `bnserve serve`)
    model_control: str = "none"
    repository_poll_secs: float = 15.0  # --model-control poll: seconds between repository scans
    on_out_of_range: str = "flag"  # inputs outside the training profile: flag, ignore, reject
    out_of_range_k: float = 4.0  # the allowed range: [min - k std, max + k std] of training
    drift_window_secs: float = 600.0  # the window of recent inputs the drift PSI is computed on
    allow_signature_change: bool = False  # reloads may change a model's inputs/outputs/labels

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> ServiceConfig:
        """Build from a plain dict (tests); unknown keys are an error, not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UsageError(f"unknown service settings: {', '.join(sorted(unknown))}")
        return replace(cls(), **values)
