"""Shared fixtures: a tiny trained checkpoint, and running the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Runs `python -m bnserve ARGS` as a user would, capturing output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bnserve", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="session")
def iris_run(tmp_path_factory) -> Path:
    """A small model trained through the real CLI on the bundled iris data (about a second)."""
    out = tmp_path_factory.mktemp("iris_run")
    result = run_cli(
        "train",
        "sklearn:iris",
        "--out",
        str(out),
        "--epochs",
        "30",
        "--hidden",
        "16,16",
        "--quiet",
        "--population-stats",
    )
    assert result.returncode == 0, result.stderr
    return out
