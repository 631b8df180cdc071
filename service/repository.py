"""Model files and versions on disk: one `.onnx` file, or a Triton-layout repository.

A repository is `REPO/<name>/<version>/model.onnx`; versions are positive-integer folder names
compared as numbers (so 10 is newer than 2) and the highest is the default. Anything else is
skipped with a warning rather than refused, as Triton does. Only the file system is read here,
so the gunicorn master can call it before forking without touching onnxruntime.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from bnserve.errors import ModelError

log = logging.getLogger("bnserve.service")

MODEL_FILENAME = "model.onnx"

#: model name -> version -> file, versions in ascending order.
Repository = dict[str, dict[int, Path]]


def find_models(path: Path | str, model_name: str | None = None) -> Repository:
    """Find the models at `path`: a file is served as `model_name` (default its stem), version 1."""
    path = Path(path)
    if path.is_file():
        if path.suffix != ".onnx":
            raise ModelError(f"{path}: expected an .onnx file or a model repository directory")
        return {model_name or path.stem: {1: path}}
    if not path.is_dir():
        raise ModelError(f"{path}: no such model file or repository directory")
    repository: Repository = {}
    for model_dir in sorted(p for p in path.iterdir() if p.is_dir()):
        versions = _find_versions(model_dir)
        if versions:
            repository[model_dir.name] = versions
        else:
            log.warning("%s: no <version>/%s inside, skipped", model_dir, MODEL_FILENAME)
    if not repository:
        raise ModelError(
            f"{path}: no models found; expected {path}/<name>/<version>/{MODEL_FILENAME} "
            "(or pass an .onnx file)"
        )
    if model_name is not None and model_name not in repository:
        raise ModelError(
            f"--model-name {model_name!r} is not in {path} (models: {', '.join(repository)})"
        )
    return repository


def _find_versions(model_dir: Path) -> dict[int, Path]:
    versions: dict[int, Path] = {}
    for entry in model_dir.iterdir():
        version = parse_version(entry.name)
        if version is None:
            log.warning("%s: not a positive-integer version folder, ignored", entry)
        elif not (entry / MODEL_FILENAME).is_file():
            log.warning("%s: no %s inside, ignored", entry, MODEL_FILENAME)
        else:
            versions[version] = entry / MODEL_FILENAME
    return dict(sorted(versions.items()))


def parse_version(text: str) -> int | None:
    """A version folder or URL part as a positive integer, else None ("01" is version 1)."""
    if not text.isascii() or not text.isdigit():
        return None
    version = int(text)
    return version if version > 0 else None


def default_version(versions: dict[int, Path]) -> int:
    """The highest version, compared as numbers."""
    return max(versions)


def repository_of(state: dict[str, Any]) -> Repository:
    """model -> version -> stored copy, from a state document."""
    return {
        name: {int(v): Path(entry["path"]) for v, entry in sorted(versions.items(), key=_num)}
        for name, versions in state["models"].items()
    }


def _num(item: tuple[str, Any]) -> int:
    return int(item[0])
