"""gunicorn configuration for `bnserve serve`, and the application object that runs it in-process.

Running gunicorn through its application API (not a subprocess) makes the `bnserve serve` process
the gunicorn master, so TERM/HUP/TTIN sent to it reach gunicorn directly. The app is not preloaded:
each worker calls `create_app` after the fork and creates its own onnxruntime sessions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

from gunicorn import util
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.errors import HaltServer

from bnserve.service.config import (
    GRPC_BOOT_ERROR,
    ServiceConfig,
    bracketed,
    grpc_heartbeat_path,
)
from bnserve.service.errors import error_body
from bnserve.service.metrics import mark_dead
from bnserve.service.reload import ModelStore, RepositoryPoller
from bnserve.service.repository import Repository

log = logging.getLogger("bnserve.service")


# gunicorn's own request-head limits, stated here because they bound what one request can cost:
# the request line, the number of header fields and the size of each.
# --worker-class -> what gunicorn loads: its own sync and gthread, our fairer gevent.
WORKER_CLASSES = {
    "gevent": "bnserve.service.workers.GeventWorker",
    "sync": "sync",
    "gthread": "gthread",
}
LIMIT_REQUEST_LINE = 8190
LIMIT_REQUEST_FIELDS = 100
LIMIT_REQUEST_FIELD_SIZE = 8190


def gunicorn_settings(config: ServiceConfig) -> dict[str, Any]:
    """gunicorn settings for `config`: gevent workers by default (docs/serving.md says why)."""
    settings: dict[str, Any] = {
        "bind": [f"{bracketed(config.host)}:{config.port}"],
        "workers": config.workers,
        "threads": config.threads,
        "worker_class": WORKER_CLASSES[config.worker_class],
        "worker_connections": config.worker_connections,
        # gevent and gthread: idle keep-alive time; gevent also reads each request's headers
        # under this deadline, so a client that sends them slowly loses its connection.
        "keepalive": config.keep_alive,
        "limit_request_line": LIMIT_REQUEST_LINE,
        "limit_request_fields": LIMIT_REQUEST_FIELDS,
        "limit_request_field_size": LIMIT_REQUEST_FIELD_SIZE,
        "timeout": config.timeout,
        "graceful_timeout": config.timeout,
        "preload_app": False,  # sessions must be created after the fork
        "loglevel": config.log_level,
        "errorlog": "-",
        "accesslog": None,
        "proc_name": "bnserve",
        "when_ready": when_ready,
        "post_fork": post_fork,
        "child_exit": child_exit,
        "max_requests": config.max_requests,
        "max_requests_jitter": config.max_requests_jitter,
        # gunicorn >= 25.1 opens a control socket under $HOME by default; a read-only HOME (a
        # container) or two servers for one user would collide, and nothing here uses it.
        "control_socket_disable": True,
    }
    # The worker heartbeat file: on a read-only root, /tmp may be missing; /dev/shm is memory.
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        settings["worker_tmp_dir"] = "/dev/shm"
    return settings


def when_ready(server: Any) -> None:
    """Once the master has bound its sockets: defer accepting connections until they carry data
    (Linux TCP_DEFER_ACCEPT, up to --keep-alive seconds), so a connection that sends nothing
    never takes a worker's connection slot and the first read of an accepted one finds its
    request (+3% req/s with a new connection per request, 1 client); then log where we listen."""
    for listener in server.LISTENERS:
        sock = getattr(listener, "sock", None)
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError, AttributeError):  # not Linux, or not TCP
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, server.cfg.keepalive)
    addresses = ", ".join(str(listener) for listener in server.LISTENERS)
    log.info("bnserve is listening on %s with %d worker(s)", addresses, server.num_workers)


def post_fork(server: Any, worker: Any) -> None:
    """In each worker, before it boots:

    - stop/quit signals take their default action until the worker installs its own handlers:
      the child inherits the master's handlers, which only queue the signal for the master's
      loop, so a SIGTERM that arrives while the worker boots (gevent's monkey patch, loading the
      models) would be lost and the stop would wait for the graceful timeout, then SIGKILL;
    - gunicorn's own answers (a malformed request line, header or chunk, which gunicorn refuses
      before the app sees it) become JSON `{"error": ...}` instead of HTML.
    """
    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(number, signal.SIG_DFL)
    util.write_error = write_json_error


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's `util.write_error` with the service's error shape."""
    body = error_body(f"{reason}: {mesg}" if mesg else reason)
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def child_exit(server: Any, worker: Any) -> None:
    """A worker exited (or was killed): drop its live metric gauges."""
    mark_dead(worker.pid)


class GrpcProcesses:
    """The gRPC processes (`python -m bnserve.service.grpc_server RUNTIME_DIR`, --grpc-workers of
    them), kept by the master as it keeps its workers: started once gunicorn listens, started
    again when one dies (after 1 s, doubling up to 30 s while they keep dying within 10 s of
    starting), killed (then started again) when its heartbeat file is older than --timeout, as
    gunicorn kills a silent worker, stopped with the workers. One that cannot start serving (exit status 3: a port
    it cannot bind, say) halts the server, as a worker that cannot boot does."""

    BACKOFF = (1.0, 30.0)
    SHORT_LIFE = 10.0

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.procs: dict[int, tuple[subprocess.Popen, float]] = {}  # slot -> (process, started)
        self.backoff = self.BACKOFF[0]
        self.next_start = 0.0
        self.stopping = False

    def start(self) -> None:
        """Start what is missing (not during a back-off, nor once stopping)."""
        if self.stopping or time.monotonic() < self.next_start:
            return
        for slot in range(self.config.grpc_workers):
            if slot not in self.procs:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "bnserve.service.grpc_server", self.config.runtime_dir],
                    stdin=subprocess.DEVNULL,
                    close_fds=True,
                )
                self.procs[slot] = (proc, time.monotonic())
                log.debug("started gRPC process %d", proc.pid)

    def reap(self) -> None:
        """Collect the exit status of ours that exited (gunicorn's own reaping, waitpid(-1),
        would take it and log them as unknown children); halt on a boot failure."""
        for slot, (proc, started) in list(self.procs.items()):
            try:
                pid, status = os.waitpid(proc.pid, os.WNOHANG)
            except ChildProcessError:  # reaped meanwhile by gunicorn: status unknown
                pid, status = proc.pid, 0
            if pid == 0:
                continue
            del self.procs[slot]
            mark_dead(proc.pid)  # its counters join the archive
            grpc_heartbeat_path(self.config.runtime_dir, proc.pid).unlink(missing_ok=True)
            code = proc.returncode = os.waitstatus_to_exitcode(status)
            if self.stopping:
                continue
            if code == GRPC_BOOT_ERROR:
                raise HaltServer("the gRPC server failed to start", GRPC_BOOT_ERROR)
            lived = time.monotonic() - started
            log.error("gRPC process %d exited (status %s) after %.1f s", proc.pid, code, lived)
            short = lived < self.SHORT_LIFE
            self.backoff = min(self.backoff * 2, self.BACKOFF[1]) if short else self.BACKOFF[0]
            self.next_start = time.monotonic() + (self.backoff if short else 0.0)

    def kill_silent(self) -> None:
        """SIGKILL each process whose heartbeat is older than --timeout (reap starts another);
        one still starting (no heartbeat yet) is left to boot."""
        for proc, _ in self.procs.values():
            try:
                silent = (
                    time.time()
                    - grpc_heartbeat_path(self.config.runtime_dir, proc.pid).stat().st_mtime
                )
            except OSError:
                continue
            if silent > self.config.timeout and proc.poll() is None:
                log.error(
                    "gRPC process %d took no work for %.0f s (frozen, or every thread stuck in a "
                    "call; --timeout %d): killing it",
                    proc.pid,
                    silent,
                    self.config.timeout,
                )
                with contextlib.suppress(OSError):
                    proc.kill()

    def signal(self, sig: int) -> None:
        """Send `sig` to every gRPC process (SIGTERM: stop gracefully), and start no more."""
        self.stopping = True
        for proc, _ in self.procs.values():
            with contextlib.suppress(OSError):
                proc.send_signal(sig)

    def wait(self, deadline: float) -> None:
        """Wait for them until `deadline` (time.monotonic()), then SIGKILL what is left."""
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            except ChildProcessError:  # reaped by gunicorn's waitpid(-1)
                pass
            mark_dead(proc.pid)
        self.procs.clear()


class BnserveArbiter(Arbiter):
    """gunicorn's master with these changes, all for operations:

    - SIGHUP queues a reload of the models and the token file (service/reload.py) instead of
      replacing the workers. The master never validates anything itself: once a second (its
      loop tick) it starts the reload runner process when requests are pending and none runs,
      so a storm of SIGHUPs costs one pass and never delays replacing a dead worker.
    - SIGTERM with `--drain-seconds N`: readiness answers 503 in every worker while they keep
      serving for N seconds, then the usual graceful stop. A second SIGTERM stops at once.
    - `--model-control poll`: the same tick rescans the repository when it is time
      (service/reload.py `RepositoryPoller`) and queues what changed for the reload runner.
    - With --grpc-port, it also keeps the gRPC processes (`GrpcProcesses`): started after the
      listening sockets, restarted when one dies, stopped with the workers.
    """

    def __init__(self, app: BnserveApplication) -> None:
        super().__init__(app)
        self.bnserve_config: ServiceConfig = app.config
        self.drain_deadline: float | None = None
        self.reload_runner: subprocess.Popen | None = None
        self.poller: RepositoryPoller | None = None
        if self.bnserve_config.model_control == "poll":
            self.poller = RepositoryPoller(self.bnserve_config, self._store())
        self.grpc = GrpcProcesses(app.config) if app.config.grpc_port else None

    def start(self) -> None:
        super().start()
        if self.grpc is not None:
            config = self.bnserve_config
            address = f"{bracketed(config.host)}:{config.grpc_port}"
            self.log.info("starting %d gRPC process(es) for %s", config.grpc_workers, address)
            self.grpc.start()

    def reap_workers(self) -> None:
        if self.grpc is not None:
            self.grpc.reap()
        super().reap_workers()

    def stop(self, graceful: bool = True) -> None:
        """Stop the gRPC processes with the workers (both stop taking requests at once), within
        the same graceful timeout."""
        if self.grpc is None:
            return super().stop(graceful)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        self.grpc.signal(signal.SIGTERM if graceful else signal.SIGKILL)
        super().stop(graceful)
        self.grpc.wait(deadline)

    def _store(self) -> Any:
        return ModelStore(self.bnserve_config.runtime_dir)

    def handle_hup(self) -> None:
        self.log.info("SIGHUP: reloading the models and the token file")
        try:
            self._store().submit(
                "load", None, self.bnserve_config.allow_signature_change, tokens=True
            )
        except Exception:  # the master must survive whatever a reload meets
            self.log.exception("cannot queue the reload")
            return
        self.start_reload_runner()

    def start_reload_runner(self) -> None:
        """Start `python -m bnserve.service.reload` when requests wait and no runner is alive."""
        runner = self.reload_runner
        if runner is not None:
            if runner.poll() is None:
                return
            mark_dead(runner.pid)  # its reload counters join the archive
            self.reload_runner = None
        try:
            if not self._store().has_pending():
                return
            self.reload_runner = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bnserve.service.reload",
                    str(self.bnserve_config.runtime_dir),
                ],
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        except Exception:
            self.log.exception("cannot start the reload runner")

    def handle_term(self) -> None:
        drain = self.bnserve_config.drain_seconds
        if drain <= 0 or self.drain_deadline is not None:
            raise StopIteration
        store = self._store()
        if store is not None:
            store.set_draining()
        self.drain_deadline = time.monotonic() + drain
        self.log.info("SIGTERM: draining for %.1f s (readiness answers 503), then stopping", drain)

    def murder_workers(self) -> None:  # called once per master loop (about a second)
        super().murder_workers()
        if self.poller is not None:
            try:
                self.poller.tick(time.monotonic())
            except Exception:  # the master must survive whatever a scan meets
                self.log.exception("repository poll failed")
        self.start_reload_runner()
        if self.grpc is not None:
            self.grpc.kill_silent()
            self.grpc.reap()
            self.grpc.start()
        if self.drain_deadline is not None and time.monotonic() >= self.drain_deadline:
            self.log.info("drain period over: stopping gracefully")
            raise StopIteration


class BnserveApplication(BaseApplication):
    """gunicorn's application API: settings from our config, app built in each worker."""

    def __init__(
        self,
        config: ServiceConfig,
        repository: Repository,
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.repository = repository  # found once in the master; workers only load it
        self.settings = gunicorn_settings(config) if settings is None else settings
        super().__init__()

    def run(self) -> None:
        try:
            BnserveArbiter(self).run()
        except RuntimeError as exc:
            print(f"\nError: {exc}\n", file=sys.stderr)
            sys.exit(1)

    def load_config(self) -> None:
        for key, value in self.settings.items():
            if key in self.cfg.settings:  # older gunicorn has no control-socket settings
                self.cfg.set(key, value)

    def load(self) -> Any:
        from bnserve.service.app import create_app  # Flask and onnxruntime: workers only

        return create_app(self.config)  # the models come from the store's copies (reload.py)
