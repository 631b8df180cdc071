"""The models one worker has loaded, and the lookups the HTTP layers make on every request.

A model that fails to load in a worker is kept as "not ready" (503) with its reason instead of
raising: a worker that raises while booting makes the gunicorn master halt the whole server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from bnserve.errors import BnserveError
from service.errors import BadRequestError, NotFoundError, NotReadyError
from service.repository import Repository, default_version, parse_version
from service.runtime import ModelRuntime

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
        if default_model is None and len(self.models) == 1:
            default_model = next(iter(self.models))
        self.default_model = default_model

    def load_all(self, device: str, intra_op_threads: int, output_kind: str) -> None:
        """Load every version; failures are logged and leave that version not ready."""
        for model in self.models.values():
            for version, path in model.paths.items():
                try:
                    runtime = ModelRuntime.load(
                        path, model.name, version, device, intra_op_threads, output_kind
                    )
                except BnserveError as exc:
                    model.errors[version] = str(exc)
                    log.error("model %s version %d not loaded: %s", model.name, version, exc)
                else:
                    model.loaded[version] = runtime
                    log.debug(
                        "loaded %s v%d from %s on %s in %.3f s",
                        model.name,
                        version,
                        path,
                        runtime.device,
                        runtime.load_seconds,
                    )

    @property
    def ready(self) -> bool:
        return all(m.ready for m in self.models.values())

    def model(self, name: str) -> ModelVersions:
        try:
            return self.models[name]
        except KeyError:
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
