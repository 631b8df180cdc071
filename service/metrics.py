"""Prometheus metrics across gunicorn workers (prometheus-client in multiprocess mode).

Every process writes its values to memory-mapped files in one directory, and `/metrics` sums them
with a `MultiProcessCollector`. So the directory is set (`PROMETHEUS_MULTIPROC_DIR`) before
`prometheus_client` is first imported, emptied when the server starts (`prepare_dir`, in the
master), and the live gauges of a dead worker are dropped in gunicorn's `child_exit` hook
(`mark_dead`). `prometheus_client` is only imported inside functions here, never at module level,
so importing this module cannot freeze the library into single-process mode by accident.

The hot path pays a dict lookup and a few memory-mapped float writes per request: the labelled
children are created once per label set and cached.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ENV = "PROMETHEUS_MULTIPROC_DIR"
# Sub-millisecond buckets: one example through a small MLP takes well under a millisecond.
LATENCY_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)


def prepare_dir(path: str | Path) -> Path:
    """Create the directory, remove metric files left by an earlier run, export it (master)."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink(missing_ok=True)
    os.environ[ENV] = str(directory)
    return directory


# Counter and histogram values of exited processes are summed into one file per type, so that
# /metrics reads a number of files bounded by the live workers, not by every worker ever started.
ARCHIVED_TYPES = ("counter", "histogram")
# "0archive" sorts before every pid, so /metrics reads the archive before the files that may be
# merged into it meanwhile (and retries when one vanished): no scrape counts a value twice.
ARCHIVE_PID = "0archive"


def mark_dead(pid: int) -> None:
    """A worker (or reload runner) exited: drop its live gauges and fold its counters and
    histograms into the archive files (gunicorn `child_exit` hook and the reload tick, both in
    the master, the archive's only writer)."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)
    archive_process(Path(directory), str(pid))


def archive_process(directory: Path, pid: str) -> None:
    """Add `pid`'s counter/histogram files into `<type>_archive.db`, then delete them."""
    from prometheus_client.mmap_dict import MmapedDict

    for kind in ARCHIVED_TYPES:
        dead = directory / f"{kind}_{pid}.db"
        if not dead.exists():
            continue
        values = MmapedDict.read_all_values_from_file(str(dead))
        archive = MmapedDict(str(directory / f"{kind}_{ARCHIVE_PID}.db"))
        try:
            for key, value, _timestamp, _pos in values:
                archive.write_value(key, archive.read_value(key)[0] + value, 0.0)
        finally:
            archive.close()
        dead.unlink(missing_ok=True)


class Metrics:
    """The service's metrics; one instance per process, children cached per label set."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.multiprocess = bool(os.environ.get(ENV))
        if self.multiprocess:
            _cache_process_id()
        self.requests = Counter(
            "bnserve_requests_total",
            "HTTP requests answered, by route template, method and status code",
            ["route", "method", "status"],
        )
        self.request_seconds = Histogram(
            "bnserve_request_duration_seconds",
            "Time from receiving the request to having the response ready, by route template",
            ["route"],
            buckets=LATENCY_BUCKETS,
        )
        self.grpc_requests = Counter(
            "bnserve_grpc_requests_total",
            "gRPC calls answered (Open Inference Protocol and health checks), by method and status code",
            ["method", "code"],
        )
        self.grpc_request_seconds = Histogram(
            "bnserve_grpc_request_duration_seconds",
            "Time from receiving a gRPC call to having its response ready, by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
        )
        self.inference_seconds = Histogram(
            "bnserve_inference_duration_seconds",
            "onnxruntime session.run time, by model",
            ["model"],
            buckets=LATENCY_BUCKETS,
        )
        self.in_flight = Gauge(
            "bnserve_requests_in_flight",
            "HTTP requests and gRPC calls being handled now (summed over live workers)",
            multiprocess_mode="livesum",
        )
        self.drift_psi = Gauge(
            "bnserve_drift_psi",
            "Population stability index of each input over the recent window against the "
            "training deciles (above 0.2: a significant shift); updated when /metrics is read",
            ["model", "input"],
            multiprocess_mode="mostrecent",
        )
        self.unknown_categories = Counter(
            "bnserve_unknown_categories_total",
            "Categorical values a model never saw in training (answered as its 'other' "
            "categories), by model and input column",
            ["model", "input"],
        )
        self.out_of_range = Counter(
            "bnserve_out_of_range_total",
            "Input values outside the model's training profile ([min - k std, max + k std], or "
            "an unseen category), by model and input",
            ["model", "input"],
        )
        self.model_loads = Counter(
            "bnserve_model_loads_total",
            "Model versions loaded into a worker (boot and reload), by model and result",
            ["model", "result"],
        )
        self.model_reloads = Counter(
            "bnserve_model_reloads_total",
            "Reload requests (SIGHUP or the repository API), by model and result; a failed "
            "one leaves every worker on the last good model",
            ["model", "result"],
        )
        self.model_info = Gauge(
            "bnserve_model_info",
            "1 for each model version a live worker serves (per worker pid), with its device "
            "and content hash",
            ["model", "version", "device", "sha256"],
            multiprocess_mode="liveall",
        )
        # the labelled children of the per-request metrics, by label values
        self._requests: dict[tuple[str, ...], Any] = {}
        self._request_seconds: dict[tuple[str, ...], Any] = {}
        self._grpc_requests: dict[tuple[str, ...], Any] = {}
        self._grpc_request_seconds: dict[tuple[str, ...], Any] = {}

    def observe_request(self, route: str, method: str, status: str, seconds: float) -> None:
        _child(self.requests, self._requests, (route, method, status)).inc()
        _child(self.request_seconds, self._request_seconds, (route,)).observe(seconds)

    def observe_grpc(self, method: str, code: str, seconds: float) -> None:
        _child(self.grpc_requests, self._grpc_requests, (method, code)).inc()
        _child(self.grpc_request_seconds, self._grpc_request_seconds, (method,)).observe(seconds)

    def unknown_category_counter(self, model: str) -> Any:
        """`count(column, n)`: unknown categories seen by `model` (handed to the runtime)."""
        return self._counter(self.unknown_categories, model)

    def out_of_range_counter(self, model: str) -> Any:
        """`count(input, n)`: values of `model`'s inputs outside its training profile."""
        return self._counter(self.out_of_range, model)

    @staticmethod
    def _counter(counter: Any, model: str) -> Any:
        def count(label: str, n: int) -> None:
            counter.labels(model, label).inc(n)

        return count

    def inference_observer(self, model: str) -> Any:
        """The `observe(seconds)` of the model's inference histogram (handed to the runtime)."""
        return self.inference_seconds.labels(model).observe

    def served(self, model: str, version: int, device: str, sha256: str, on: bool) -> None:
        self.model_info.labels(model, str(version), device, sha256).set(1 if on else 0)


def _child(metric: Any, cache: dict[tuple[str, ...], Any], values: tuple[str, ...]) -> Any:
    """The child of `metric` for these label values, created once and cached: `labels()`
    costs a lock and a dict build per call."""
    child = cache.get(values)
    if child is None:
        child = cache[values] = metric.labels(*values)
    return child


def render() -> tuple[bytes, str]:
    """The metrics page of every process (multiprocess) or of this one; (body, content type)."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        for _attempt in range(4):
            try:
                return generate_latest(registry), CONTENT_TYPE_LATEST
            except FileNotFoundError:  # a dead process's file was archived during the read
                continue
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def _cache_process_id() -> None:
    """Multiprocess values call `os.getpid()` (a system call) on every update, to notice a fork;
    six updates per request made it 7% of a worker's time. Metrics are created in each process
    after any fork (workers, the reload runner), so this process's id, read once, is enough."""
    from prometheus_client import values

    pid = os.getpid()
    values.ValueClass = values.MultiProcessValue(process_identifier=lambda: pid)


_METRICS: Metrics | None = None


def get_metrics() -> Metrics:
    """This process's metrics (created once: prometheus refuses to register a name twice)."""
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS
