"""Hot reload: the model store, the state file every worker watches, and the reload runner.

A request reaches one gunicorn worker, and a signal reaches the master, but a reload must change
every worker and must never take the server down, block the master, or break existing clients.
So:

- Every model file served is first copied into `RUNTIME_DIR/store/<sha256>.onnx` (by content
  hash); workers load only those copies. A file truncated or replaced later on disk cannot reach
  a worker that boots afterwards (after a crash, SIGKILL or `--max-requests` recycling), because
  that worker loads the last good copy: a worker that fails to boot would halt gunicorn. The
  bearer tokens are kept the same way (`RUNTIME_DIR/tokens`, validated before it is replaced),
  so every worker, whenever it started, accepts the same tokens.
- `RUNTIME_DIR/models.json` (the state) names the copy each model version is served from, the
  unloaded models, the tokens' hash and whether the server is draining. It is replaced atomically
  (write + rename) under a short lock, then its generation number is written into
  `RUNTIME_DIR/generation`, 8 bytes that every worker maps into memory: a worker compares them
  with the generation it serves on every request (a memory read, no system call) and reads the
  state and switches before answering when they differ.
- A reload is a request in a queue (`RUNTIME_DIR/reloads.json`): SIGHUP in the master queues "every
  model, and the tokens"; `POST /v2/repository/models/{m}/load|unload` in a worker queues that
  model and waits for its ticket. The master starts one runner process (`python -m
  bnserve.service.reload RUNTIME_DIR`) when requests are pending and none runs; the runner takes every
  pending request at once (20 SIGHUPs or 100 load calls cost one pass), copies the changed files,
  validates the copies in a probe child (`bnserve.service.probe`: load and warm up, as a worker would),
  compares their signature with the served one, and only when all of that passes writes the new
  state. A bad candidate is logged, counted in `bnserve_model_reloads_total`, and leaves every
  worker on the last good model. The master itself only appends to a file and starts a process.

Only the file system and child processes are used here: the master runs this without importing
onnxruntime.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import orjson

from bnserve.atomic import write_bytes_atomic
from bnserve.errors import BnserveError
from bnserve.service.auth import read_tokens
from bnserve.service.config import ServiceConfig
from bnserve.service.logs import configure_logging
from bnserve.service.metrics import get_metrics
from bnserve.service.probe import probe_models
from bnserve.service.repository import Repository, find_models

log = logging.getLogger("bnserve.service")

STATE_FILE = "models.json"
QUEUE_FILE = "reloads.json"
CONFIG_FILE = "config.json"
TOKENS_FILE = "tokens"
GENERATION_FILE = "generation"
_KEPT_JOBS = 64  # finished jobs remembered for the waiters (each names its ticket range)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class ModelStore:
    """The runtime directory: model copies, token copy, state, reload queue, service config."""

    def __init__(self, runtime_dir: str | Path) -> None:
        self.dir = Path(runtime_dir)
        self.store = self.dir / "store"
        self.state_path = self.dir / STATE_FILE
        self.queue_path = self.dir / QUEUE_FILE
        self.tokens_path = self.dir / TOKENS_FILE
        self.generation_path = self.dir / GENERATION_FILE

    # -- state file -------------------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        return orjson.loads(self.state_path.read_bytes())

    def write(self, state: dict[str, Any]) -> None:
        """Replace the state atomically (a new inode: workers notice it with one stat)."""
        write_bytes_atomic(self.state_path, orjson.dumps(state, option=orjson.OPT_INDENT_2))

    def update(self, change: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """Read, let `change` edit the state in place, and write it with the next generation
        when `change` returns True; one short lock, so a reload and a drain never lose a write."""
        with _flock(self.dir / "state.lock"):
            state = self.read()
            if change(state):
                state["generation"] += 1
                self.write(state)
                self.publish(state["generation"])
            return state

    def publish(self, generation: int) -> None:
        """Tell every worker a new state is in place (after the rename: never before it)."""
        with self.generation_path.open("r+b") as f, mmap.mmap(f.fileno(), 8) as shared:
            struct.pack_into("<q", shared, 0, generation)

    def generation_watch(self) -> GenerationWatch:
        return GenerationWatch(self.generation_path)

    def set_draining(self) -> None:
        def drain(state: dict[str, Any]) -> bool:
            state["draining"] = True
            return True

        self.update(drain)

    def set_grpc_serving(self) -> None:
        """A gRPC process serves: readiness may say yes (once; a restarted one changes nothing)."""

        def serving(state: dict[str, Any]) -> bool:
            return bool(state.pop("grpc_starting", False))

        self.update(serving)

    # -- copies by content hash -------------------------------------------------------------

    def keep(self, source: Path) -> tuple[Path, str]:
        """Copy `source` into the store under its content hash; returns (copy, sha256)."""
        self.store.mkdir(parents=True, exist_ok=True)
        data = source.read_bytes()  # hash exactly the bytes that are kept
        sha = hashlib.sha256(data).hexdigest()
        target = self.store / f"{sha}.onnx"
        if not target.exists():
            write_bytes_atomic(target, data)
        return target, sha

    def keep_tokens(self, tokens: tuple[bytes, ...]) -> str:
        """Write the validated tokens where every worker reads them (owner-only); their hash."""
        data = b"\n".join(tokens) + b"\n"
        write_bytes_atomic(self.tokens_path, data, mode=0o600)
        return hashlib.sha256(data).hexdigest()

    def read_tokens(self) -> tuple[bytes, ...]:
        return tuple(line for line in self.tokens_path.read_bytes().splitlines() if line)

    def init(
        self,
        repository: Repository,
        config: ServiceConfig,
        signatures: dict[str, dict[str, Any]] | None = None,
        tokens: tuple[bytes, ...] | None = None,
    ) -> dict[str, Any]:
        """At start-up (master): copy every served file, write generation 0 and the config."""
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
                    "signature": (signatures or {}).get(name, {}).get(str(version)),
                }
        state = {
            "generation": 0,
            "draining": False,
            # until a gRPC process serves, readiness says no: a client that waits for it
            # must find both protocols answering (service/grpc_server.py announces itself)
            "grpc_starting": bool(config.grpc_port),
            "models": models,
            "unloaded": {},
            "tokens_sha256": self.keep_tokens(tokens) if tokens else None,
        }
        self.write(state)
        write_bytes_atomic(self.generation_path, struct.pack("<q", 0))
        write_bytes_atomic(self.dir / CONFIG_FILE, orjson.dumps(asdict(config)))
        write_bytes_atomic(self.queue_path, orjson.dumps({"next": 1, "pending": [], "jobs": []}))
        return state

    def config(self) -> ServiceConfig:
        return ServiceConfig(**orjson.loads((self.dir / CONFIG_FILE).read_bytes()))

    def _forget_unused(self, state: dict[str, Any]) -> None:
        used = {
            entry["path"]
            for group in ("models", "unloaded")
            for versions in state.get(group, {}).values()
            for entry in versions.values()
        }
        for copy in self.store.glob("*.onnx"):
            if str(copy) not in used:
                copy.unlink(missing_ok=True)

    # -- the reload queue -------------------------------------------------------------------

    def _edit_queue(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        with _flock(self.dir / "queue.lock"):
            queue = orjson.loads(self.queue_path.read_bytes())
            result = change(queue)
            write_bytes_atomic(self.queue_path, orjson.dumps(queue))
            return result

    def submit(
        self,
        action: str,
        names: list[str] | None,
        allow_signature_change: bool = False,
        tokens: bool = False,
    ) -> int:
        """Queue a reload ("load", names None = every served model) or an "unload"; the ticket."""

        def add(queue: dict[str, Any]) -> int:
            ticket = queue["next"]
            queue["next"] += 1
            queue["pending"].append(
                {
                    "ticket": ticket,
                    "action": action,
                    "names": names,
                    "allow": allow_signature_change,
                    "tokens": tokens,
                }
            )
            return ticket

        return self._edit_queue(add)

    def has_pending(self) -> bool:
        try:
            return bool(orjson.loads(self.queue_path.read_bytes())["pending"])
        except (OSError, ValueError, KeyError):
            return False

    def _take_pending(self) -> list[dict[str, Any]]:
        def take(queue: dict[str, Any]) -> list[dict[str, Any]]:
            pending, queue["pending"] = queue["pending"], []
            return pending

        return self._edit_queue(take)

    def _finish(self, tickets: list[int], results: dict[str, Any]) -> None:
        def record(queue: dict[str, Any]) -> None:
            queue["jobs"] = [*queue["jobs"], {"tickets": tickets, "results": results}][-_KEPT_JOBS:]

        self._edit_queue(record)

    def result(self, ticket: int) -> dict[str, Any] | None:
        """The results of the job that served `ticket`, or None while it is pending."""
        queue = orjson.loads(self.queue_path.read_bytes())
        for job in reversed(queue["jobs"]):
            if ticket in job["tickets"]:
                return job["results"]
        return None

    def wait(self, ticket: int, timeout: float, poll: float = 0.05) -> dict[str, Any] | None:
        """Wait for `ticket`'s results (time.sleep: cooperative under gevent workers)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            results = self.result(ticket)
            if results is not None:
                return results
            time.sleep(poll)
        return None


class RepositoryPoller:
    """`--model-control poll`: the master rescans the repository every `--repository-poll-secs`
    (directory listings and file stats only) and, when anything changed, queues a load of every
    model found (new models and versions appear, changed files are validated and compared like
    any reload, removed versions drop out) and an unload of served models that are gone; the
    reload runner does the work, so in-flight requests finish on the models they started with."""

    def __init__(self, config: ServiceConfig, store: ModelStore) -> None:
        self.config = config
        self.store = store
        self.next_scan = 0.0
        # the repository as the server starts with it (the master makes this before any worker)
        self.snapshot: dict[str, Any] = self.scan()

    def scan(self) -> dict[str, Any]:
        """{name: {version: (path, mtime_ns, size)}} of the repository as it is now."""
        try:
            found = find_models(self.config.model, self.config.model_name)
        except BnserveError as exc:
            log.error("cannot scan the model repository %s: %s", self.config.model, exc)
            return {}
        snapshot: dict[str, Any] = {}
        for name, versions in found.items():
            entries = {}
            for version, path in versions.items():
                try:
                    info = Path(path).stat()
                except OSError:
                    continue
                entries[version] = (str(path), info.st_mtime_ns, info.st_size)
            snapshot[name] = entries
        return snapshot

    def tick(self, now: float) -> bool:
        """Scan when it is time; True when reload requests were queued."""
        if now < self.next_scan:
            return False
        self.next_scan = now + self.config.repository_poll_secs
        snapshot = self.scan()
        previous, self.snapshot = self.snapshot, snapshot
        if snapshot == previous:
            return False
        served = set(self.store.read()["models"])
        gone = sorted(served - set(snapshot))
        if gone:
            log.info("repository poll: %s removed, unloading", ", ".join(gone))
            self.store.submit("unload", gone)
        if snapshot:
            log.info("repository poll: changes found, loading %s", ", ".join(sorted(snapshot)))
            self.store.submit("load", sorted(snapshot), self.config.allow_signature_change)
        return True


class GenerationWatch:
    """A worker's read-only view of the published state generation (8 shared bytes)."""

    def __init__(self, path: Path) -> None:
        with path.open("rb") as f:
            self._shared = mmap.mmap(f.fileno(), 8, access=mmap.ACCESS_READ)

    def current(self) -> int:
        return struct.unpack_from("<q", self._shared)[0]


class StateFollower:
    """A worker's side of the state: before answering a request (HTTP or gRPC), switch its
    models, its tokens or start draining when a new state was published. One shared-memory read
    per request; the state file is read only when the generation moved."""

    def __init__(self, store: ModelStore, registry: Any, config: ServiceConfig, auth: Any) -> None:
        self.store = store
        self.registry = registry  # service.registry.ModelRegistry
        self.config = config
        self.auth = auth  # service.auth.BearerAuth, or None without --token-file
        self._generation = store.generation_watch()

    def follow(self) -> None:
        generation = self._generation.current()
        if generation == self.registry.generation:
            return
        try:
            state = self.store.read()
        except (OSError, ValueError) as exc:
            log.error("cannot read the model state %s: %s", self.store.state_path, exc)
            return
        config = self.config
        tokens_before = self.registry.tokens_sha256
        self.registry.apply_state(state, config.device, config.intra_op_threads, config.output_kind)
        if self.auth is not None and self.registry.tokens_sha256 != tokens_before:
            self._reload_tokens()

    def _reload_tokens(self) -> None:
        """The master validated the new token file before publishing it: read its copy."""
        try:
            self.auth.tokens = self.store.read_tokens()
        except OSError as exc:  # keep the tokens in force rather than open or lock out
            log.error("cannot read the new tokens %s: %s", self.store.tokens_path, exc)
            return
        log.info("bearer tokens reloaded (%d token(s))", len(self.auth.tokens))


class ReloadError(BnserveError):
    """A reload candidate failed validation; every worker stays on the last good model."""

    exit_code = 1
    http_status = 400


def signature_diff(old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[str]:
    """Readable differences between two model signatures (runtime.ModelRuntime.signature)."""
    if not old or not new:
        return []
    changes = []
    for key in ("input", "datatype", "n_features", "feature_names", "outputs", "labels"):
        before, after = old.get(key), new.get(key)
        if before != after:
            changes.append(f"{key}: {_short(before)} -> {_short(after)}")
    return changes


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 6:
        return f"[{', '.join(map(repr, value[:5]))}, ... ({len(value)} in all)]"
    return repr(value)


# -- the runner ---------------------------------------------------------------------------------


def run_pending(store: ModelStore, config: ServiceConfig) -> int:
    """Serve every queued request, in passes, until none is left; the number of passes."""
    passes = 0
    with _flock(store.dir / "reload.lock"):  # one runner at a time, whoever started it
        while True:
            pending = store._take_pending()
            if not pending:
                return passes
            passes += 1
            tickets = [p["ticket"] for p in pending]
            try:
                results = _run_job(store, config, pending)
            except Exception as exc:  # answer the waiters whatever happened
                log.exception("reload failed")
                results = {"*": {"result": "failed", "error": f"{type(exc).__name__}: {exc}"}}
            store._finish(tickets, results)


def _merge(pending: list[dict[str, Any]], served: list[str]) -> tuple[dict[str, tuple], bool]:
    """{name: (action, allow)} with the last action per name winning, and whether any request
    asked for the tokens; `allow` is true when any coalesced load of that name allowed it."""
    actions: dict[str, tuple[str, bool]] = {}
    tokens = False
    for request in pending:
        tokens |= bool(request["tokens"])
        for name in request["names"] if request["names"] is not None else served:
            previous = actions.get(name)
            allow = bool(request["allow"])
            if previous is not None and previous[0] == request["action"] == "load":
                allow |= previous[1]
            actions[name] = (request["action"], allow)
    return actions, tokens


def _run_job(
    store: ModelStore, config: ServiceConfig, pending: list[dict[str, Any]]
) -> dict[str, Any]:
    metrics = get_metrics()
    state = store.read()
    actions, want_tokens = _merge(pending, list(state["models"]))
    results: dict[str, Any] = {}
    changes: dict[str, tuple[str, dict[str, Any] | None]] = {}
    tokens_sha = _reload_tokens(store, config, results) if want_tokens else None
    found: Repository = {}
    scan_error = None
    if any(action == "load" for action, _ in actions.values()):
        try:
            found, scan_error = find_models(config.model, config.model_name), None
        except BnserveError as exc:
            found, scan_error = {}, str(exc)
    for name, (action, allow) in actions.items():
        if action == "unload":
            if name in state["models"]:
                changes[name] = ("unload", None)
                log.info("unloaded model %s", name)
                results[name] = {"result": "unloaded", "versions": _hashes(state["models"][name])}
            elif name in state["unloaded"]:
                results[name] = {"result": "unchanged", "versions": {}}
            else:
                results[name] = {"result": "failed", "error": f"unknown model {name!r}"}
            continue
        current = state["models"].get(name) or state["unloaded"].get(name) or {}
        try:
            if scan_error is not None:
                raise ReloadError(scan_error)
            entries = _load_candidate(store, config, name, found, current, allow)
        except ReloadError as exc:
            log.error("reload of model %s failed, keeping the last good model: %s", name, exc)
            metrics.model_reloads.labels(name, "failed").inc()
            results[name] = {"result": "failed", "error": str(exc), "versions": _hashes(current)}
            continue
        if entries is None and name in state["models"]:
            metrics.model_reloads.labels(name, "unchanged").inc()
            results[name] = {"result": "unchanged", "versions": _hashes(current)}
            continue
        entries = entries or current
        changes[name] = ("load", entries)
        metrics.model_reloads.labels(name, "ok").inc()
        log.info(
            "reloaded model %s: %s",
            name,
            ", ".join(f"v{v} {e['sha256'][:12]}" for v, e in entries.items()),
        )
        results[name] = {"result": "ok", "versions": _hashes(entries)}

    def apply(state: dict[str, Any]) -> bool:
        for name, (action, entries) in changes.items():
            if action == "unload":
                state["unloaded"][name] = state["models"].pop(name, None) or {}
            else:
                state["unloaded"].pop(name, None)
                state["models"][name] = entries
        if tokens_sha is not None and tokens_sha != state.get("tokens_sha256"):
            state["tokens_sha256"] = tokens_sha
            return True
        return bool(changes)

    store._forget_unused(store.update(apply))
    return results


def _reload_tokens(store: ModelStore, config: ServiceConfig, results: dict[str, Any]) -> str | None:
    """Re-read --token-file; a bad file keeps the last good tokens (logged), never opens up."""
    if not config.token_file:
        return None
    try:
        tokens = read_tokens(config.token_file)
    except BnserveError as exc:
        log.error("token file not reloaded, the last good tokens stay in force: %s", exc)
        results["tokens"] = {"result": "failed", "error": str(exc)}
        return None
    results["tokens"] = {"result": "ok"}
    return store.keep_tokens(tokens)


def _load_candidate(
    store: ModelStore,
    config: ServiceConfig,
    name: str,
    found: Repository,
    current: dict[str, Any],
    allow: bool,
) -> dict[str, Any] | None:
    """The new state entries of model `name`, None when nothing changed; raises ReloadError."""
    if name not in found:
        raise ReloadError(f"model {name!r} is not in {config.model}")
    entries: dict[str, Any] = {}
    candidates: dict[int, Path] = {}
    sources: dict[str, str] = {}
    for version, source in found[name].items():
        try:
            copy, sha = store.keep(source)
        except OSError as exc:
            raise ReloadError(f"{source}: cannot read it: {exc}") from None
        old = current.get(str(version))
        entries[str(version)] = {
            "path": str(copy),
            "sha256": sha,
            "source": str(source),
            "signature": old["signature"] if old is not None else None,
        }
        if old is None or old["sha256"] != sha:
            candidates[version] = copy
            sources[str(copy)] = str(source)
    if not candidates and set(entries) == set(current):
        return None
    if candidates:
        try:
            probed = probe_models(replace(config, model_name=None), {name: candidates})
        except BnserveError as exc:
            message = str(exc)
            for copy_path, source in sources.items():
                message = message.replace(copy_path, source)
            raise ReloadError(message) from None
        for version, details in probed["models"][name].items():
            new = details.get("signature")
            old = _served_signature(current, version)
            diff = signature_diff(old, new)
            if diff and not allow:
                raise ReloadError(
                    f"version {version} changes what clients send or receive ({'; '.join(diff)}); "
                    "existing clients would break. Serve it anyway with --allow-signature-change "
                    '(SIGHUP) or {"parameters": {"allow_signature_change": true}} in the load '
                    "request"
                )
            if diff:
                log.warning("model %s version %s: signature changed: %s", name, version, diff)
            entries[version]["signature"] = new
    return entries


def _served_signature(current: dict[str, Any], version: str) -> dict[str, Any] | None:
    """The signature a client of `version` relies on: that version's, else the default's (the
    highest version, which unversioned requests reach)."""
    if version in current:
        return current[version].get("signature")
    if not current:
        return None
    return current[max(current, key=int)].get("signature")


def _hashes(versions: dict[str, Any]) -> dict[str, str]:
    return {v: e["sha256"] for v, e in versions.items()}


def main(argv: list[str] | None = None) -> int:
    """`python -m bnserve.service.reload RUNTIME_DIR`: the runner the gunicorn master starts."""
    args = sys.argv[1:] if argv is None else argv
    store = ModelStore(args[0])
    config = store.config()
    configure_logging(config.log_level)
    run_pending(store, config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
