"""CUDA execution provider checks; skipped cleanly where onnxruntime has no CUDA provider.

Run on a GPU machine with `pytest -m cuda tests/service`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from bnserve.service.runtime import ModelRuntime
from tests.service.support import build_mlp_classifier

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        "CUDAExecutionProvider" not in ort.get_available_providers(),
        reason="onnxruntime has no CUDAExecutionProvider here",
    ),
]


def test_cuda_is_really_used_and_matches_cpu(tmp_path: Path) -> None:
    path = build_mlp_classifier(tmp_path / "m.onnx", hidden=256)
    cuda = ModelRuntime.load(path, "m", 1, device="cuda")
    assert cuda.session.get_providers()[0] == "CUDAExecutionProvider"
    assert cuda.device == "cuda"
    cpu = ModelRuntime.load(path, "m", 1, device="cpu")
    x = np.random.default_rng(0).normal(size=(1024, 8)).astype(np.float32)
    np.testing.assert_allclose(cuda.probabilities(x), cpu.probabilities(x), atol=1e-5)


def test_auto_picks_cuda_when_it_works(tmp_path: Path) -> None:
    runtime = ModelRuntime.load(build_mlp_classifier(tmp_path / "m.onnx"), "m", 1, device="auto")
    assert runtime.device == "cuda"
