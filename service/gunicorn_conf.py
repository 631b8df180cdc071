"""gunicorn configuration for `bnserve serve`, and the application object that runs it in-process.

Running gunicorn through its application API (not a subprocess) makes the `bnserve serve` process
the gunicorn master, so TERM/HUP/TTIN sent to it reach gunicorn directly. The app is not preloaded:
each worker calls `create_app` after the fork and creates its own onnxruntime sessions.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from gunicorn.app.base import BaseApplication

from service.config import ServiceConfig
from service.repository import Repository

log = logging.getLogger("bnserve.service")


def gunicorn_settings(config: ServiceConfig) -> dict[str, Any]:
    """gunicorn settings for `config`: sync workers, or gthread when --threads > 1."""
    host = (
        f"[{config.host}]"
        if ":" in config.host and not config.host.startswith("[")
        else config.host
    )
    settings: dict[str, Any] = {
        "bind": [f"{host}:{config.port}"],
        "workers": config.workers,
        "threads": config.threads,
        "worker_class": "gthread" if config.threads > 1 else "sync",
        "timeout": config.timeout,
        "graceful_timeout": config.timeout,
        "preload_app": False,  # sessions must be created after the fork
        "loglevel": config.log_level,
        "errorlog": "-",
        "accesslog": None,
        "proc_name": "bnserve",
        "when_ready": when_ready,
        # gunicorn >= 25.1 opens a control socket under $HOME by default; a read-only HOME (a
        # container) or two servers for one user would collide, and nothing here uses it.
        "control_socket_disable": True,
    }
    # The worker heartbeat file: on a read-only root, /tmp may be missing; /dev/shm is memory.
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        settings["worker_tmp_dir"] = "/dev/shm"
    return settings


def when_ready(server: Any) -> None:
    """Log where the server listens once the master has bound its sockets."""
    addresses = ", ".join(str(listener) for listener in server.LISTENERS)
    log.info("bnserve is listening on %s with %d worker(s)", addresses, server.num_workers)


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

    def load_config(self) -> None:
        for key, value in self.settings.items():
            if key in self.cfg.settings:  # older gunicorn has no control-socket settings
                self.cfg.set(key, value)

    def load(self) -> Any:
        from service.app import create_app
        from service.registry import ModelRegistry

        config = self.config
        registry = ModelRegistry(self.repository, config.model_name)
        registry.load_all(config.device, config.intra_op_threads, config.output_kind)
        return create_app(config, registry)
