"""The models one worker has loaded, and the lookups the HTTP layers make on every request.

A model that fails to load in a worker is kept as "not ready" (503) with its reason instead of
raising: a worker that raises while booting makes the gunicorn master halt the whole server.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bnserve.errors import BnserveError
from bnserve.service.errors import BadRequestError, NotFoundError, NotReadyError
from bnserve.service.repository import (
    Repository,
    default_version,
    parse_version,
    repository_of,
)
from bnserve.service.runtime import ModelRuntime

log = logging.getLogger("bnserve.service")


@dataclass
class ModelVersions:
    """All versions of one model name: loaded runtimes, and load errors for the others."""

    name: str
    paths: dict[int, Path]
    loaded: dict[int, ModelRuntime] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    @property
    def default(self) -> int:
        return default_version(self.paths)

    @property
    def ready(self) -> bool:
        return len(self.loaded) == len(self.paths)

    def version_names(self) -> list[str]:
        return [str(v) for v in self.paths]


class ModelRegistry:
    """Name/version lookup over the loaded models; the default model serves `POST /predict`."""

    def __init__(self, repository: Repository, default_model: str | None = None) -> None:
        self.models = {name: ModelVersions(name, paths) for name, paths in repository.items()}
        self._configured_default = default_model
        self.default_model = default_model
        self._pick_default()
        self.unloaded: set[str] = set()  # unloaded through the repository API (explicit mode)
        self.tokens_sha256: str | None = None  # the state's token generation
        self.draining = False  # set from the state file after SIGTERM with --drain-seconds
        self.grpc_starting = False  # set from the state file until a gRPC process serves
        self.generation = -1  # the state file generation applied (service/reload.py)
        self.hashes: dict[tuple[str, int], str] = {}
        self.metrics: Any = None  # service.metrics.Metrics, when the app counts
        # gthread workers: two requests may see a new state file at once (or one of them runs
        # the repository load route); one of them switches, the other finds it done.
        self._switch = threading.Lock()

    def _pick_default(self) -> None:
        """With no --model-name, a server of one model serves it on `POST /predict`."""
        if self._configured_default is None:
            self.default_model = next(iter(self.models)) if len(self.models) == 1 else None

    def load_all(self, device: str, intra_op_threads: int, output_kind: str) -> None:
        """Load every version; failures are logged and leave that version not ready."""
        for model in self.models.values():
            for version, path in model.paths.items():
                runtime = self._load(
                    model.name, version, path, device, intra_op_threads, output_kind
                )
                if isinstance(runtime, str):
                    model.errors[version] = runtime
                else:
                    model.loaded[version] = runtime

    def _load(
        self,
        name: str,
        version: int,
        path: Path,
        device: str,
        intra_op_threads: int,
        output_kind: str,
    ) -> ModelRuntime | str:
        """A loaded runtime, or the reason it could not be loaded (logged and counted)."""
        try:
            runtime = ModelRuntime.load(path, name, version, device, intra_op_threads, output_kind)
        except BnserveError as exc:
            log.error("model %s version %d not loaded: %s", name, version, exc)
            if self.metrics is not None:
                self.metrics.model_loads.labels(name, "failed").inc()
            return str(exc)
        log.debug(
            "loaded %s v%d from %s on %s in %.3f s",
            name,
            version,
            path,
            runtime.device,
            runtime.load_seconds,
        )
        if self.metrics is not None:
            self.metrics.model_loads.labels(name, "ok").inc()
            runtime.observe = self.metrics.inference_observer(name)
            runtime.count_unknown = self.metrics.unknown_category_counter(name)
            runtime.count_out_of_range = self.metrics.out_of_range_counter(name)
        return runtime

    def attach_metrics(self, metrics: Any) -> None:
        """Count into `metrics` from now on, and publish what is loaded."""
        self.metrics = metrics
        for model in self.models.values():
            for version, runtime in model.loaded.items():
                runtime.observe = metrics.inference_observer(model.name)
                runtime.count_unknown = metrics.unknown_category_counter(model.name)
                runtime.count_out_of_range = metrics.out_of_range_counter(model.name)
                sha = self.hashes.get((model.name, version), "")
                metrics.served(model.name, version, runtime.device, sha, True)

    def apply_state(
        self, state: dict[str, Any], device: str, intra_op_threads: int, output_kind: str
    ) -> None:
        """Switch to the state file's models (hot reload), loading only what changed.

        A version that fails to load here keeps serving its previous runtime: the master
        validated the file, so this is a local problem (memory, a vanished copy), logged.
        """
        with self._switch:
            self._apply_state(state, device, intra_op_threads, output_kind)

    def _apply_state(
        self, state: dict[str, Any], device: str, intra_op_threads: int, output_kind: str
    ) -> None:
        if state["generation"] <= self.generation:  # already applied, or an older read
            return
        self.draining = bool(state.get("draining"))
        self.grpc_starting = bool(state.get("grpc_starting"))
        models: dict[str, ModelVersions] = {}
        hashes: dict[tuple[str, int], str] = {}
        for name, paths in repository_of(state).items():
            old = self.models.get(name)
            model = models[name] = ModelVersions(name, paths)
            for version, path in paths.items():
                sha = state["models"][name][str(version)]["sha256"]
                previous = old.loaded.get(version) if old is not None else None
                if previous is not None and self.hashes.get((name, version)) == sha:
                    model.loaded[version], hashes[(name, version)] = previous, sha
                    continue
                runtime = self._load(name, version, path, device, intra_op_threads, output_kind)
                if isinstance(runtime, str):
                    if previous is None:
                        model.errors[version] = runtime
                        continue
                    runtime, sha = previous, self.hashes.get((name, version), "")
                model.loaded[version], hashes[(name, version)] = runtime, sha
        if self.metrics is not None:
            for (name, version), sha in self.hashes.items():
                runtime = self.models[name].loaded.get(version) if name in self.models else None
                if runtime is not None and hashes.get((name, version)) != sha:
                    self.metrics.served(name, version, runtime.device, sha, False)
            for (name, version), sha in hashes.items():
                self.metrics.served(name, version, models[name].loaded[version].device, sha, True)
        self.models, self.hashes, self.generation = models, hashes, state["generation"]
        self.unloaded = set(state.get("unloaded") or ())
        self.tokens_sha256 = state.get("tokens_sha256")
        self._pick_default()

    @property
    def ready(self) -> bool:
        """Every model version is loaded."""
        return all(m.ready for m in self.models.values())

    @property
    def ready_to_serve(self) -> bool:
        """What readiness answers: every model loaded, not draining, gRPC (when on) started."""
        return self.ready and not self.draining and not self.grpc_starting

    def model(self, name: str) -> ModelVersions:
        try:
            return self.models[name]
        except KeyError:
            if name in self.unloaded:
                raise NotFoundError(
                    f"model {name!r} is unloaded; POST /v2/repository/models/{name}/load "
                    "serves it again"
                ) from None
            raise NotFoundError(
                f"unknown model {name!r} (models: {', '.join(self.models)})"
            ) from None

    def version_of(self, model: ModelVersions, version: str | None) -> int:
        if version is None:
            return model.default
        number = parse_version(version)
        if number is None or number not in model.paths:
            raise NotFoundError(
                f"model {model.name!r} has no version {version!r} "
                f"(versions: {', '.join(model.version_names())})"
            )
        return number

    def get(self, name: str | None, version: str | None = None) -> ModelRuntime:
        """The runtime for `name` (None: the default model) and `version` (None: the highest)."""
        if name is None:
            if self.default_model is None:
                raise BadRequestError(
                    f"this server has several models ({', '.join(self.models)}): "
                    "POST /models/{name}/predict to choose one"
                )
            name = self.default_model
        model = self.model(name)
        number = self.version_of(model, version)
        runtime = model.loaded.get(number)
        if runtime is None:
            reason = model.errors.get(number, "still loading")
            raise NotReadyError(f"model {name!r} version {number} is not ready: {reason}")
        return runtime
