"""Load every model once in a child process before gunicorn starts, and report what happened.

The master must not create onnxruntime sessions (they, and CUDA, are not fork-safe), but a bad
model or a CUDA provider that falls back to CPU should stop `bnserve serve` with a clear message
instead of failing in every worker. So the check runs where forking does not matter: a fresh
`python -m bnserve.service.probe` process, which loads and warms up each model as a worker would. It also
settles `--device auto` once, so every worker uses the same device.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bnserve.errors import BnserveError, ModelError
from bnserve.service.config import ServiceConfig
from bnserve.service.repository import find_models

_MARKER = "BNSERVE_PROBE "


def probe_models(
    config: ServiceConfig,
    repository: dict[str, dict[int, Any]] | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run the probe child; returns {"device": ..., "models": {...}} or raises ModelError.

    With `repository` ({name: {version: path}}) those files are checked instead of
    `config.model` (a hot-reload candidate).
    """
    document: dict[str, Any] = {"config": dataclasses.asdict(config)}
    if repository is not None:
        document["repository"] = {
            name: {str(v): str(p) for v, p in versions.items()}
            for name, versions in repository.items()
        }
    request = json.dumps(document)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bnserve.service.probe"],
            input=request,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ModelError(f"loading the models took more than {timeout:.0f} s") from None
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(_MARKER):
            result = json.loads(line[len(_MARKER) :])
            break
    else:
        detail = done.stderr.strip().splitlines()[-5:]
        raise ModelError(
            f"the model check process failed (exit {done.returncode}): {' | '.join(detail)}"
        )
    if "error" in result:
        raise ModelError(result["error"])
    return result


def _probe(config: ServiceConfig, repository: dict[str, Any] | None = None) -> dict[str, Any]:
    # the registry loads onnxruntime: only in this child, never in the parent (the master)
    from bnserve.service.registry import ModelRegistry

    if repository is None:
        found = find_models(config.model, config.model_name)
    else:
        found = {
            name: {int(v): Path(p) for v, p in versions.items()}
            for name, versions in repository.items()
        }
    registry = ModelRegistry(found, config.model_name if repository is None else None)
    registry.load_all(config.device, config.intra_op_threads, config.output_kind)
    errors = [e for m in registry.models.values() for e in m.errors.values()]
    if errors:
        return {"error": "; ".join(errors)}
    models: dict[str, Any] = {}
    devices = set()
    for name, model in registry.models.items():
        models[name] = {}
        for version, runtime in model.loaded.items():
            devices.add(runtime.device)
            models[name][str(version)] = {
                "n_features": runtime.info.n_features,
                "n_classes": runtime.n_classes,
                "output_kind": runtime.info.output_kind,
                "device": runtime.device,
                "feature_names": list(runtime.info.feature_names or ()),
                "signature": runtime.signature(),
            }
    return {"device": "cuda" if "cuda" in devices else "cpu", "models": models}


def main() -> int:
    """Child entry point: config JSON on stdin, one marked JSON line on stdout."""
    document = json.loads(sys.stdin.read())
    config = ServiceConfig(**document["config"])
    try:
        result = _probe(config, document.get("repository"))
    except BnserveError as exc:
        result = {"error": str(exc)}
    print(_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
