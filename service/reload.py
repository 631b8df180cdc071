"""Hot reload: the model store, the state file every worker watches, and the reload procedure.

A request reaches one gunicorn worker, and a signal reaches the master, but a reload must change
every worker and must never take the server down. So:

- Every model file served is first copied into `RUNTIME_DIR/store/<sha256>.onnx` (by content
  hash); workers load only those copies. A file truncated or replaced later on disk cannot reach
  a worker that boots afterwards (after a crash, SIGKILL or `--max-requests` recycling), because
  that worker loads the last good copy: a worker that fails to boot would halt gunicorn.
- `RUNTIME_DIR/models.json` (the state) names the copy each model version is served from, and
  whether the server is draining. It is replaced atomically (write + rename); each worker checks
  its inode and mtime with one `stat` per request and switches to a new state before answering.
- A reload (SIGHUP in the master, or `POST /v2/repository/models/{m}/load` in any worker) copies
  the changed files into the store, validates the copies in a child process (`service.probe`:
  load and warm up, as a worker would), and only when every changed version of a model passes
  writes the new state. A bad candidate is logged, counted in `bnserve_model_reloads_total`, and
  leaves the state (and so every worker) on the last good model.

Only the file system and a child process are used here: the master runs this without importing
onnxruntime.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from bnserve.errors import BnserveError
from service.config import ServiceConfig
from service.repository import Repository, find_models

log = logging.getLogger("bnserve.service")

STATE_FILE = "models.json"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class ModelStore:
    """The runtime directory: `store/<sha256>.onnx` copies, `models.json` state, a lock file."""

    def __init__(self, runtime_dir: str | Path) -> None:
        self.dir = Path(runtime_dir)
        self.store = self.dir / "store"
        self.state_path = self.dir / STATE_FILE

    # -- state file -------------------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        return orjson.loads(self.state_path.read_bytes())

    def write(self, state: dict[str, Any]) -> None:
        """Replace the state atomically (a new inode: workers notice it with one stat)."""
        tmp = self.dir / f".{STATE_FILE}.{os.getpid()}.tmp"
        tmp.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))
        os.replace(tmp, self.state_path)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One reload at a time across the master and the workers."""
        with (self.dir / "lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- copies by content hash -------------------------------------------------------------

    def keep(self, source: Path) -> tuple[Path, str]:
        """Copy `source` into the store under its content hash; returns (copy, sha256)."""
        self.store.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()  # hash exactly the bytes that are kept
        sha = hashlib.sha256(data).hexdigest()
        target = self.store / f"{sha}.onnx"
        if not target.exists():
            tmp = self.store / f".{sha}.{os.getpid()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return target, sha

    def init(self, repository: Repository) -> dict[str, Any]:
        """At start-up (master): copy every served file, write generation 0."""
        self.dir.mkdir(parents=True, exist_ok=True)
        models: dict[str, Any] = {}
        for name, versions in repository.items():
            models[name] = {}
            for version, path in versions.items():
                copy, sha = self.keep(path)
                models[name][str(version)] = {
                    "path": str(copy),
                    "sha256": sha,
                    "source": str(path),
                }
        state = {"generation": 0, "draining": False, "models": models}
        self.write(state)
        return state

    def set_draining(self) -> None:
        with self.locked():
            state = self.read()
            state["draining"] = True
            state["generation"] += 1
            self.write(state)

    def _forget_unused(self, state: dict[str, Any]) -> None:
        used = {v["path"] for versions in state["models"].values() for v in versions.values()}
        for copy in self.store.glob("*.onnx"):
            if str(copy) not in used:
                copy.unlink(missing_ok=True)


def repository_of(state: dict[str, Any]) -> Repository:
    """model -> version -> stored copy, from a state document."""
    return {
        name: {int(v): Path(entry["path"]) for v, entry in sorted(versions.items(), key=_num)}
        for name, versions in state["models"].items()
    }


def _num(item: tuple[str, Any]) -> int:
    return int(item[0])


class ReloadError(BnserveError):
    """A reload candidate failed validation; every worker stays on the last good model."""

    exit_code = 1
    http_status = 400


def reload_models(
    store: ModelStore, config: ServiceConfig, names: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Re-read the models named (all when None) from where they were served from.

    Returns {model: {"result": "ok"|"unchanged"|"failed", "error"?: ..., "versions": {...}}}.
    Never raises for a bad candidate: the result says so, the state keeps the last good model.
    """
    from service.metrics import get_metrics
    from service.probe import probe_models

    metrics = get_metrics()
    results: dict[str, dict[str, Any]] = {}
    with store.locked():
        state = store.read()
        wanted = list(state["models"]) if names is None else names
        try:
            found = find_models(config.model, config.model_name)
            scan_error = None
        except BnserveError as exc:
            found, scan_error = {}, str(exc)
        changed = False
        for name in wanted:
            current = state["models"][name]
            try:
                if scan_error is not None:
                    raise ReloadError(scan_error)
                if name not in found:
                    raise ReloadError(f"model {name!r} is no longer in {config.model}")
                entries: dict[str, Any] = {}
                candidates: dict[int, Path] = {}
                sources: dict[str, str] = {}
                for version, source in found[name].items():
                    try:
                        copy, sha = store.keep(source)
                    except OSError as exc:
                        raise ReloadError(f"{source}: cannot read it: {exc}") from None
                    entries[str(version)] = {
                        "path": str(copy),
                        "sha256": sha,
                        "source": str(source),
                    }
                    old = current.get(str(version))
                    if old is None or old["sha256"] != sha:
                        candidates[version] = copy
                        sources[str(copy)] = str(source)
                if not candidates and set(entries) == set(current):
                    results[name] = {"result": "unchanged", "versions": _hashes(current)}
                    metrics.model_reloads.labels(name, "unchanged").inc()
                    continue
                if candidates:
                    probe_config = replace(config, model_name=None)
                    try:
                        probe_models(probe_config, {name: candidates})
                    except BnserveError as exc:
                        message = str(exc)
                        for copy_path, source in sources.items():
                            message = message.replace(copy_path, source)
                        raise ReloadError(message) from None
            except ReloadError as exc:
                log.error("reload of model %s failed, keeping the last good model: %s", name, exc)
                metrics.model_reloads.labels(name, "failed").inc()
                results[name] = {
                    "result": "failed",
                    "error": str(exc),
                    "versions": _hashes(current),
                }
                continue
            state["models"][name] = entries
            changed = True
            metrics.model_reloads.labels(name, "ok").inc()
            log.info(
                "reloaded model %s: %s",
                name,
                ", ".join(f"v{v} {e['sha256'][:12]}" for v, e in entries.items()),
            )
            results[name] = {"result": "ok", "versions": _hashes(entries)}
        if changed:
            state["generation"] += 1
            store.write(state)
        store._forget_unused(state)
    return results


def _hashes(versions: dict[str, Any]) -> dict[str, str]:
    return {v: e["sha256"] for v, e in versions.items()}
