"""Fixtures for the service tests: small ONNX classifiers built with onnx.helper, a Triton-layout
repository, real `bnserve serve` processes (gunicorn, 2 workers) on free ports, and a small
raw-column model trained and converted through the CLI.

The servers are session-scoped (start-up loads onnxruntime in a probe and in every worker, a few
seconds) and stopped by PID with SIGTERM at the end, which also checks a clean gunicorn shutdown.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from bnserve.cli import main
from tests.service.support import (
    MAX_BATCH,
    MAX_BODY_BYTES,
    LiveServer,
    build_foreign_logits,
    build_mlp_classifier,
    free_port,
    start_server,
    stop_server,
)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """REPO/clf/{1,2,10}, REPO/foreign/1, plus folders the repository must ignore."""
    repo = tmp_path_factory.mktemp("repo")
    for version in (1, 2, 10):
        build_mlp_classifier(repo / "clf" / str(version) / "model.onnx", seed=version)
    build_mlp_classifier(repo / "clf" / "notes" / "model.onnx", seed=99)  # not a version
    build_mlp_classifier(repo / "clf" / "0" / "model.onnx", seed=98)  # not positive
    (repo / "clf" / "3").mkdir()  # a version folder without model.onnx
    build_foreign_logits(repo / "foreign" / "1" / "model.onnx")
    (repo / "empty").mkdir()
    return repo


@pytest.fixture(scope="session")
def foreign_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_foreign_logits(tmp_path_factory.mktemp("single") / "foreign_logits.onnx")


def _unwritable_home(tmp: Path) -> str:
    """A HOME under a regular file: nothing can be created there, not even by root."""
    blocker = tmp / "not-a-directory"
    blocker.write_text("HOME cannot be created under a file\n")
    return str(blocker / "home")


@pytest.fixture(scope="session")
def server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The repository served by 2 workers (HTTP and gRPC), flags only, with a HOME nobody can
    write."""
    tmp = tmp_path_factory.mktemp("server")
    live = start_server(
        [
            str(model_repo),
            "--model-name",
            "clf",
            "--workers",
            "2",
            "--max-batch",
            str(MAX_BATCH),
            "--max-body-mb",
            str(MAX_BODY_BYTES / 1024 / 1024),
        ],
        tmp / "serve.log",
        {"HOME": _unwritable_home(tmp)},
        grpc=True,
    )
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def env_server(
    foreign_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """One foreign .onnx file, configured only through BNSERVE_* environment variables."""
    tmp = tmp_path_factory.mktemp("env_server")
    live = start_server(
        [],
        tmp / "serve.log",
        {
            "BNSERVE_MODEL": str(foreign_file),
            "BNSERVE_MODEL_NAME": "foreign_single",
            "BNSERVE_WORKERS": "1",
            "BNSERVE_PORT": str(free_port()),
            "BNSERVE_GRPC_PORT": str(free_port()),
            "BNSERVE_HOST": "127.0.0.1",
            "BNSERVE_DEVICE": "cpu",
            "BNSERVE_LOG_LEVEL": "debug",
        },
    )
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def raw_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained on raw columns (a number with missing cells, a yes/no column, a category
    with missing cells), converted: one graph input per column."""
    root = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(8)
    data = root / "train.csv"
    with data.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["size", "flag", "color", "y"])
        for i in range(300):
            size = "" if i % 17 == 0 else f"{rng.normal(loc=i % 2 * 2):.3f}"
            color = ["red", "blue", "green", ""][i % 4]
            writer.writerow([size, ["yes", "no"][i % 3 == 0], color, ["a", "b"][i % 2]])
    run = root / "run"
    assert main(["train", str(data), "--label", "y", "--out", str(run), "--epochs", "3",
                 "--hidden", "8", "--quiet"]) == 0  # fmt: skip
    model = root / "raw.onnx"
    assert main(["convert", str(run / "checkpoint.npz"), "-o", str(model), "-q"]) == 0
    return model
